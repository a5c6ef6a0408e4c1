"""ONNX Runtime backend: one ``InferenceSession`` per stage, tuned for chaining them.

Options (what they do and why: ``docs/runtime.md``; measurements: ``benchmarks/results``):

- ``threads`` / ``spinning``: intra-op threads per session; the stage sessions' workers do
  not spin by default (idle pools of the stages that are not running would steal the
  running stage's cores). ``alone_spinning``: the spinning of the sessions that run alone in
  a call when they are separate sessions (the composed chain, the ``If`` graph,
  ``full.onnx``): within a run by default (``"run"``: none is left spinning when the next
  call takes another session); when only ``spinning`` is given, it applies to both
  (``benchmarks/results/latency.md``). Batch 1 and the chain normally share one session
  (:mod:`dgconvert.runtime.passes.one_call`), and the chain without any gate (every gate
  off) is the one session every call takes: those spin like a default session unless
  either option is given (``one_session_spinning``).
- ``fuse_boundaries``: on the CPU, features cross stage boundaries in ORT's blocked NCHWc
  layout (graph pass :mod:`dgconvert.runtime.passes.boundary_fusion`), self-checked
  against the plain graphs.
- int8 bundles (``dgconvert quantize``): features cross stage boundaries as the int8 tensor
  instead (:mod:`dgconvert.runtime.passes.int8_boundary`), self-checked likewise.
- ``compose``: the (fused) optimized stage graphs are also composed into one session that
  runs the whole chain, compaction inside (:mod:`dgconvert.runtime.passes.chain`),
  self-checked; :meth:`OnnxRuntimeBackend.chain` offers it to the runner.
- ``in_graph_exits``: the same graphs composed for one image, each gate an ONNX ``If``
  (:mod:`dgconvert.runtime.passes.if_graph`), self-checked;
  :meth:`OnnxRuntimeBackend.single` offers it to the runner. With the chain, in one
  session: an outer ``If`` picks the path (:mod:`dgconvert.runtime.passes.one_call`).

A fast path that is not used says why in :meth:`OnnxRuntimeBackend.describe` and, when it
was wanted and failed, in a logged warning. ``run_stage`` calls the session's C++ ``run``
directly (the runner has validated the batch already).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.core.bundle import Bundle
from dgconvert.core.contract import CONTRACT
from dgconvert.core.errors import BackendOptionError, BackendUnavailableError, InputError
from dgconvert.core.exits import ExitRule
from dgconvert.runtime.base import Backend, StageOutput
from dgconvert.runtime.checks import close_to_reference
from dgconvert.runtime.cpu_features import u8s8_saturates
from dgconvert.runtime.fast_paths import FastPath
from dgconvert.runtime.onnxruntime_chain import ChainSession, check_chain
from dgconvert.runtime.onnxruntime_if import InGraphExits
from dgconvert.runtime.passes.boundary_fusion import (
    FusedStages,
    FusionError,
    NothingToFuse,
    fuse_nchwc_boundaries,
)
from dgconvert.runtime.passes.chain import ChainError, compose_chain
from dgconvert.runtime.passes.if_graph import compose_if
from dgconvert.runtime.passes.int8_boundary import (
    Int8Output,
    Int8Stages,
    keep_int8_boundaries,
    sum_pooled_heads,
)
from dgconvert.runtime.passes.one_call import ONE_IMAGE, compose_one_call
from dgconvert.runtime.thread_pool import default_threads, new_session_options, shared_threads

log = logging.getLogger(__name__)

Run = Callable[[Sequence[str], dict[str, Any], Any], list[np.ndarray]]


SPINNING = (False, "run", True)
#: the same settings by name, as the command line spells them
SPINNING_NAMES = {"off": False, "run": "run", "on": True}
_SPIN_WORDS = {False: "off", "run": "within runs", True: "on"}


def session_options(threads: int | None = None, spinning: bool | str = False) -> Any:
    """SessionOptions tuned for chaining several sessions on the same cores.

    ``spinning``: ``False`` (workers sleep as soon as they are idle), ``"run"`` (spin between
    the operators of one run, stop at its end: ``session.force_spinning_stop``), ``True``
    (ORT's default: keep spinning after the run too).
    """
    import onnxruntime as ort

    if spinning not in SPINNING:
        raise BackendOptionError(
            f"spinning={spinning!r} is not a thread-pool setting; expected False, 'run' or True. "
            "Fix: spinning=False (default) or spinning='run' on a machine nobody else loads."
        )
    so = new_session_options()
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if shared_threads() is not None:  # one pool for all: its own size, spinning as ORT's default
        return so
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    flag = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    if spinning == "run":
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def spinning_policy(spinning: bool | str | None,
                    alone_spinning: bool | str | None) -> tuple[bool | str, bool | str]:
    """``(stage sessions, sessions that run alone in a call)`` spinning, validated.

    By default the stage sessions do not spin and the one-session paths spin within a run
    (``"run"``; measured: ``benchmarks/results/latency.md``); ``spinning`` alone sets both.
    """
    stages = False if spinning is None else spinning
    if alone_spinning is None:
        alone_spinning = "run" if spinning is None else spinning
    for value in (stages, alone_spinning):
        session_options(1, value)  # validates
    return stages, alone_spinning


class BlockedFeatures:
    """A stage's features in ONNX Runtime's blocked NCHWc layout (fused boundaries).

    ``value`` is ``[M, Cp, H, W]`` over memory laid out ``[M, Cp/block, H, W, block]``
    (``Cp`` = channels padded to the block). Pass it back to the same backend's next stage;
    ``to_host()`` (or ``np.asarray``) returns the contract's ``[M, C, H, W]`` array.
    """

    __slots__ = ("value", "channels", "block", "stage")

    def __init__(self, value: np.ndarray, channels: int, block: int, stage: int) -> None:
        self.value, self.channels, self.block, self.stage = value, channels, block, stage

    def __repr__(self) -> str:
        return (f"BlockedFeatures(shape={self.shape}, block={self.block}, "
                f"stage={self.stage})")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.value.shape[0], self.channels, *self.value.shape[2:])

    @property
    def dtype(self) -> np.dtype:
        return self.value.dtype

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def to_host(self) -> np.ndarray:
        v, b = self.value, self.block
        m, cp, *spatial = v.shape
        blocked = v.reshape(m, cp // b, *spatial, b)
        order = (0, 1, blocked.ndim - 1, *range(2, blocked.ndim - 1))
        return np.ascontiguousarray(blocked.transpose(order).reshape(v.shape)[:, : self.channels])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self.to_host()
        return x if dtype is None else x.astype(dtype)


class QuantizedFeatures:
    """A stage's features as the int8 tensor of a quantized bundle (int8 boundaries), in the
    layout ORT computed it. Pass it back to the same backend's next stage; ``to_host()``
    (or ``np.asarray``) returns the contract's float32 ``[M, C, H, W]`` array."""

    __slots__ = ("value", "out", "stage")

    def __init__(self, value: np.ndarray, out: Int8Output, stage: int) -> None:
        self.value, self.out, self.stage = value, out, stage

    @property
    def shape(self) -> tuple[int, ...]:
        v = self.value.shape
        return (v[0], v[-1], *v[1:-1]) if self.out.channels_last else tuple(v)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def to_host(self) -> np.ndarray:
        return self.out.dequantize(self.value)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self.to_host()
        return x if dtype is None else x.astype(dtype)


#: the feature handles of this backend's fast paths (its next stage takes them as they are)
_HANDLES = (BlockedFeatures, QuantizedFeatures)


@dataclass(frozen=True)
class StagePath:
    """How one stage runs: the session call, whether its input ``x`` arrives in the fast
    path's form (blocked or int8), its output's block size (0: plain NCHW features) and real
    channel count, or how its int8 output reads back (``int8``)."""

    run: Run
    blocked_input: bool = False
    block: int = 0
    channels: int = 0
    int8: Int8Output | None = None


class OnnxRuntimeBackend(Backend):
    """Runs each stage graph with ONNX Runtime (CPU by default, providers configurable).

    ``threads``: intra-op threads per session (default: all usable cores). ``spinning`` /
    ``alone_spinning``: ``False``, ``"run"`` or ``True`` (see :func:`session_options`) for
    the stage sessions / the sessions that run alone in a call (:func:`spinning_policy`). ``fuse_boundaries``:
    keep features in ORT's blocked layout between stages (``None`` = when possible: CPU
    execution provider only, ``onnx`` installed, graphs recognised and self-checked).
    ``compose``: also build the one-session chain offered by :meth:`chain` (``None`` = when
    possible and self-checked; ``False`` = stage sessions only). ``in_graph_exits``: also
    build the batch-1 ``If`` graph offered by :meth:`single` (``None`` = when possible,
    unless ``compose=False``: stage sessions only).
    """

    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        threads: int | None = None,
        spinning: bool | str | None = None,
        fuse_boundaries: bool | None = None,
        compose: bool | None = None,
        in_graph_exits: bool | None = None,
        alone_spinning: bool | str | None = None,
    ) -> None:
        super().__init__(bundle)
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a hard dependency
            raise BackendUnavailableError(
                "onnxruntime is not installed; fix: pip install onnxruntime"
            ) from exc
        self.providers = list(providers or ["CPUExecutionProvider"])
        available = ort.get_available_providers()
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime providers {missing} are not available (available: {available}). "
                "Fix: pip install onnxruntime-gpu for CUDA/TensorRT providers, or use "
                "providers=['CPUExecutionProvider']."
            )
        quant = bundle.manifest.quantization
        if (quant is not None and quant.settings.get("weights", "int8") == "int8"
                and "CPUExecutionProvider" in wanted and u8s8_saturates()):
            log.warning("onnxruntime: %s has int8 weights and this x86 CPU has no VNNI, where "
                        "ONNX Runtime's uint8 x int8 kernels can saturate (wrong labels); fix: "
                        "quantize it again here (dgconvert quantize --weights auto)", bundle.path)
        #: the process's shared pool (:func:`share_thread_pool`), or None
        self.shared_pool = shared_threads()
        if self.shared_pool is not None:
            _check_shared(self.shared_pool, threads, spinning, alone_spinning)
        self.threads = self.shared_pool or threads or default_threads()
        self.spinning, self.alone_spinning = spinning_policy(spinning, alone_spinning)
        #: a session that is the only one its calls take (batch 1 and the chain in one
        #: session; the chain with every gate off) spins like a default ORT session by
        #: default: no pool of this backend is left spinning beside it
        self.one_session_spinning: bool | str = (
            True if spinning is None and alone_spinning is None else self.alone_spinning)
        self.run_options = ort.RunOptions()
        self._full: tuple[Run, str, Any] | None = None
        n = bundle.num_stages
        self.stage_io = [CONTRACT.stage(k, n) for k in range(n)]
        cpu_only = wanted == ["CPUExecutionProvider"]
        why_not = _fusion_unavailable(cpu_only, fuse_boundaries)
        if why_not and fuse_boundaries:
            raise BackendUnavailableError(
                f"fuse_boundaries=True was requested but {why_not.detail}. Fix: pass "
                "fuse_boundaries=None (use it when possible) or False."
            )
        # ORT's optimized stage graphs feed the boundary fusion and the one-session chain
        not_optimizable = _fusion_unavailable(cpu_only, None)
        if_option = "in_graph_exits=False"
        if in_graph_exits is None and compose is False:  # stage sessions only
            in_graph_exits, if_option = False, "compose=False"
        wants_graphs = not not_optimizable and (
            not why_not or compose is not False or in_graph_exits is not False)
        optimized = Path(tempfile.mkdtemp(prefix="dgconvert-ort-")) if wants_graphs else None
        try:
            self.sessions = [self._session(str(bundle.stage_file(k)), optimized and
                                           optimized / f"stage{k}.onnx") for k in range(n)]
            models = _load_models(optimized, n) if optimized else None
        finally:
            if optimized is not None:
                shutil.rmtree(optimized, ignore_errors=True)
        #: the contract graphs as exported, one path per stage
        self.plain = [StagePath(direct_run(s)) for s in self.sessions]
        self.fused_sessions: list[Any] = []  # the rewritten stage graphs, when fused
        self.paths = self.plain
        self.fusion_path = why_not or FastPath.failed(_FUSED, _NO_OPTIMIZED)
        chain_models = models
        if models is not None and not why_not:
            try:
                if bundle.manifest.precision == "int8":
                    int8 = self._int8_stages(keep_int8_boundaries([_copy(m) for m in models]))
                    self.fusion_path, chain_models = FastPath.on(_FUSED, int8.describe()), int8.models
                else:
                    fused = fuse_nchwc_boundaries([_copy(m) for m in models])
                    self.paths = self._check_fused(fused)
                    self.fusion_path, chain_models = FastPath.on(_FUSED, fused.describe()), fused.models
            except FusionError as exc:
                if isinstance(exc, NothingToFuse):
                    self.fusion_path = FastPath.by_choice(_FUSED, str(exc))
                else:
                    self.fusion_path = FastPath.failed(_FUSED, str(exc))
                    log.warning("onnxruntime: fused stage boundaries are off: %s", exc)
                if fuse_boundaries:
                    raise BackendUnavailableError(
                        f"fuse_boundaries=True was requested but {exc}. Fix: pass "
                        "fuse_boundaries=None or False."
                    ) from exc
        #: the optimized (fused) stage graphs the one-call paths are composed from
        self._graphs = chain_models
        #: the one-call paths that may be built: "single" (If graph), "chain"
        self._one_call_kinds: set[str] = set()
        #: the sessions of the one-call paths by set of off gates and path (or why not)
        self._one_call: dict[frozenset[int], dict[str, Any]] = {}
        self._one_call_lock = threading.Lock()
        #: set when batch 1 and the chain could not share one session
        self.merge_path: FastPath | None = None
        if in_graph_exits is not False and n >= 2:
            self._one_call_kinds.add(_SINGLE)
        self.chain_session: ChainSession | None = None
        #: chains composed without the heads of gates that are off, by the set of those gates
        self.chain_variants: dict[frozenset[int], ChainSession] = {}
        self._variant_lock = threading.Lock()
        #: set when a chain without the off gates could not be built
        self.variants_path: FastPath | None = None
        self.chain_path = self._compose(compose, chain_models, not_optimizable)
        if self.chain_session is None:
            self._one_call_kinds.discard(_CHAIN_KIND)
        self.in_graph_exits: InGraphExits | None = None
        self.if_path = (FastPath.by_choice(_IF, f"({if_option})") if in_graph_exits is False
                        else self._build_if(in_graph_exits, chain_models, not_optimizable))

    @property
    def if_graph(self) -> str:
        """The in-graph exits' state as :meth:`describe` shows it."""
        return self.if_path.text

    @property
    def fusion(self) -> str:
        """The fused boundaries' state as :meth:`describe` shows it."""
        return self.fusion_path.text

    @property
    def composition(self) -> str:
        """The one-session chain's state as :meth:`describe` shows it."""
        return self.chain_path.text

    def _session(self, model: str | bytes, optimized_path: Path | None = None,
                 level: Any = None, spinning: bool | str | None = None) -> Any:
        import onnxruntime as ort

        so = session_options(self.threads, self.spinning if spinning is None else spinning)
        if optimized_path is not None:  # ORT writes its optimized graph as a by-product
            so.optimized_model_filepath = str(optimized_path)
        if level is not None:
            so.graph_optimization_level = level
        return ort.InferenceSession(model, so, providers=self.providers)

    def _extended_session(self, model: Any, spinning: bool | str | None = None) -> Any:
        """A session on an already optimized graph (this machine's layout included): loaded
        at the extended level, since optimizing it again re-lays it out."""
        import onnxruntime as ort

        return self._session(model.SerializeToString(),
                             level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                             spinning=spinning)

    def _check_fused(self, fused: FusedStages) -> list[StagePath]:
        """Load the rewritten graphs; check them against the plain ones; their paths."""
        self.fused_sessions = [self._extended_session(m) for m in fused.models]
        runs = [direct_run(sess) for sess in self.fused_sessions]
        blocks = check_fused(self.plain, runs, fused, self.stage_io, self.run_options,
                             self.bundle.input_shape)
        return [StagePath(runs[k], fused.blocked_input[k], blocks[k],
                          o.channels if (o := fused.blocked_output[k]) else 0)
                for k in range(len(runs))]

    def _int8_stages(self, int8: Int8Stages) -> Int8Stages:
        """The int8-boundary graphs checked and in use (:attr:`paths` set), their gate heads
        pooling the int8 features where that checks too (else as they were, with a
        warning)."""
        pooled = sum_pooled_heads(
            Int8Stages([_copy(m) for m in int8.models], int8.int8_input, int8.int8_output),
            self._feature_shapes())
        if pooled.pooled_heads:
            try:
                self.paths = self._check_int8(pooled)
                return pooled
            except FusionError as exc:
                log.warning("onnxruntime: gate heads dequantize the int8 features before "
                            "pooling them (the integer pooling failed its check): %s", exc)
        self.paths = self._check_int8(int8)
        return int8

    def _feature_shapes(self) -> list[tuple[int, ...] | None]:
        """Each stage's contract ``features`` shape for one zero image (None: the last)."""
        n = self.bundle.num_stages
        x = np.zeros((1, *self.bundle.input_shape), np.float32)
        shapes: list[tuple[int, ...] | None] = []
        out = self.run_contract(0, {self.stage_io[0].inputs[0]: x})
        for k in range(n - 1):
            feats = out[CONTRACT.features]
            shapes.append(tuple(feats.shape))
            if k + 1 < n - 1:
                out = self.run_contract(k + 1, dict(zip(self.stage_io[k + 1].inputs,
                                                        (feats, np.zeros(1, np.int64)),
                                                        strict=True)))
        return [*shapes, None]

    def _check_int8(self, int8: Int8Stages) -> list[StagePath]:
        """Load the int8-boundary graphs; check them against the plain ones; their paths."""
        try:
            self.fused_sessions = [self._extended_session(m) for m in int8.models]
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise FusionError(f"ONNX Runtime refused the int8-boundary graphs: {exc}") from exc
        runs = [direct_run(sess) for sess in self.fused_sessions]

        def features(k: int, plain: np.ndarray, got: np.ndarray) -> None:
            out = int8.int8_output[k]
            if out is not None and close_to_reference(plain, out.dequantize(got),
                                                      CONTRACT.features):
                raise FusionError(f"self-check failed: stage {k} int8 features differ")

        check_paths(self.plain, runs, self.stage_io, self.run_options, self.bundle.input_shape,
                    features)
        return [StagePath(runs[k], int8.int8_input[k], int8=int8.int8_output[k])
                for k in range(len(runs))]

    def _compose(self, wanted: bool | None, models: list[Any] | None,
                 unoptimized: FastPath | None) -> FastPath:
        """Build and check the one-session chain from ORT's optimized stage graphs
        (boundaries fused when they are); ``unoptimized``: why there are no optimized
        graphs. Say what was done."""
        if wanted is False:
            return FastPath.by_choice(_CHAIN, "(compose=False)")
        if self.bundle.num_stages < 2:
            return FastPath.by_choice(_CHAIN, "one stage graph, nothing to chain")
        why_not = unoptimized.named(_CHAIN) if unoptimized else None
        if not why_not and models is None:
            why_not = FastPath.failed(_CHAIN, _NO_OPTIMIZED)
        crashing = [s.index for s in self.bundle.manifest.stages if not s.empty_batch]
        if not why_not and crashing:
            why_not = FastPath.failed(
                _CHAIN, f"ONNX Runtime crashes running stage(s) {crashing} on an empty batch "
                "(recorded at export), and the chain runs stages no row reaches")
            log.warning("onnxruntime: the one-session chain is off: %s", why_not.detail)
        if not why_not:
            self._one_call_kinds.add(_CHAIN_KIND)
            try:
                self.chain_session = self._build_chain()
            except ChainError as exc:
                why_not = FastPath.failed(_CHAIN, str(exc))
                log.warning("onnxruntime: the one-session chain is off: %s", exc)
        return _settled(why_not, wanted, "compose", FastPath.on(_CHAIN, "one session"))

    def _build_if(self, wanted: bool | None, models: list[Any] | None,
                  unoptimized: FastPath | None) -> FastPath:
        """Build and check the batch-1 ``If`` graph; say what was done."""
        if self.bundle.num_stages < 2:
            return FastPath.by_choice(_IF, "one stage graph, nothing to exit from")
        why_not = unoptimized.named(_IF) if unoptimized else None
        if not why_not and models is None:
            why_not = FastPath.failed(_IF, _NO_OPTIMIZED)
        if not why_not:
            try:
                self.in_graph_exits = InGraphExits(
                    lambda off: self._one_call_session(off, _SINGLE), self.run_stage,
                    self.run_options, self.bundle.num_stages, self.bundle.input_shape)
            except ChainError as exc:
                why_not = FastPath.failed(_IF, str(exc))
                log.warning("onnxruntime: in-graph exits are off: %s", exc)
        return _settled(why_not, wanted, "in_graph_exits", FastPath.on(_IF, "on (batch 1)"))

    def single(self) -> Any:
        """``run(image, rule) -> (score, label, exit stage)`` for one image in one session
        call (``rule``: an :class:`~dgconvert.core.exits.ExitRule` or its thresholds), each
        gate an ONNX ``If`` (deeper stages never run once it exits), or None. Gates that are
        off (+inf) are left out of the graph (built on first use with a new set of them)."""
        return self.in_graph_exits

    def _one_call_session(self, off: frozenset[int], kind: str) -> tuple[Any, Run, dict]:
        """``(session, run, feeds)`` of the one-call path ``kind`` (``"single"``: the If
        graph, ``"chain"``) without the gates in ``off``, opened on first use together with
        the other path when both may be built (one session,
        :mod:`dgconvert.runtime.passes.one_call`). Raises :class:`ChainError`."""
        with self._one_call_lock:
            entry = self._one_call.setdefault(off, {})
            if kind not in entry:
                entry.update(self._open_one_call(off, kind))
            got = entry[kind]
        if isinstance(got, ChainError):
            raise got
        return got

    def _open_one_call(self, off: frozenset[int], kind: str) -> dict[str, Any]:
        """Compose and open the one-call paths for ``off``: ``{kind: (session, run, feeds)
        or ChainError}``, ``kind`` and, when it may be built too, the other path."""
        every = len(off) == self.bundle.num_gates  # the full model: the chain alone serves
        kinds = [kind] if every else sorted(self._one_call_kinds | {kind}, reverse=True)
        out: dict[str, Any] = {}
        models: dict[str, Any] = {}
        for k in kinds:
            try:
                models[k] = _COMPOSE[k](self._graphs, off)
            except (ValueError, KeyError, AttributeError, ChainError) as exc:
                out[k] = ChainError(f"composing the {_WHAT[k]} failed: {exc}")
        if len(models) == 2:
            try:
                merged = compose_one_call(models[_SINGLE], models[_CHAIN_KIND])
                sess = self._extended_session(merged, self.one_session_spinning)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                self.merge_path = FastPath.failed(
                    _MERGED, f"gates {sorted(off)} off: {exc}" if off else str(exc))
                log.warning("onnxruntime: batch 1 and the chain run on separate sessions "
                            "(each stops spinning after its run): %s", exc)
            else:
                run = direct_run(sess)
                return {_SINGLE: (sess, run, {ONE_IMAGE: np.array([True])}),
                        _CHAIN_KIND: (sess, run, {ONE_IMAGE: np.array([False])})}
        for k, model in models.items():
            spin = self.one_session_spinning if every else self.alone_spinning
            try:
                sess = self._extended_session(model, spin)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                out[k] = ChainError(f"ONNX Runtime refused the {_WHAT[k]}: {exc}")
            else:
                out[k] = (sess, direct_run(sess), {})
        return out

    @property
    def one_session(self) -> bool:
        """Whether batch 1 and the chain run on one session (spinning
        :attr:`one_session_spinning`)."""
        single, chain = self.in_graph_exits, self.chain_session
        return (single is not None and chain is not None
                and single.full.session is chain.session)

    def _build_chain(self, off: frozenset[int] = frozenset()) -> ChainSession:
        sess, run, feeds = self._one_call_session(off, _CHAIN_KIND)
        chain = ChainSession(sess, run, self.run_options, self.bundle.num_stages, off, feeds)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((16, *self.bundle.input_shape)).astype(np.float32)
        check_chain(chain, self.run_stage, x)
        return chain

    def chain(self) -> Any:
        """``run(images, rule) -> [(score, label) or None per stage]`` of the one-session
        chain (``rule``: an :class:`~dgconvert.core.exits.ExitRule` or its thresholds), or
        None when the stages run as separate sessions. Gates that are off (+inf) cost
        nothing: the first call with a new set of them composes a chain without their heads
        and compaction (None for those stages)."""
        return None if self.chain_session is None else self._run_chain

    def _run_chain(self, images: np.ndarray, rule: ExitRule | np.ndarray) -> list[Any]:
        rule = ExitRule.of(rule)
        if not rule.off:
            return self.chain_session.run(images, rule.exit_at)  # type: ignore[union-attr]
        chain = self.chain_variants.get(rule.off) or self._chain_variant(rule.off)
        return chain.run(images, rule.exit_at)

    def _chain_variant(self, off: frozenset[int]) -> ChainSession:
        """The chain composed without the gates in ``off`` (built once; the full chain when
        that fails, with a warning)."""
        with self._variant_lock:
            if off not in self.chain_variants:
                try:
                    chain = self._build_chain(off)
                except ChainError as exc:
                    chain = self.chain_session  # type: ignore[assignment]
                    self.variants_path = FastPath.failed("chain without off gates",
                                                         f"gates {sorted(off)} off: {exc}")
                    log.warning("onnxruntime: a chain without the heads of the gates that "
                                "are off could not be built (they are computed): %s", exc)
                self.chain_variants[off] = chain
            return self.chain_variants[off]

    def fast_paths(self) -> list[FastPath]:
        paths = [self.fusion_path, self.chain_path, self.if_path]
        if self.merge_path is not None:
            paths.append(self.merge_path)
        if self.variants_path is not None:
            paths.append(self.variants_path)
        if self.in_graph_exits is not None and self.in_graph_exits.variants_path is not None:
            paths.append(self.in_graph_exits.variants_path)
        return paths

    def run_stage(self, k: int, inputs: Any, keep: np.ndarray | None) -> StageOutput:
        path = self.paths[k]
        run, block, int8 = path.run, path.block, path.int8
        if inputs.__class__ in _HANDLES:
            if inputs.stage != k - 1:
                raise InputError(
                    f"stage {k} got the features of stage {inputs.stage}; expected those "
                    f"returned by stage {k - 1} of this backend (StageOutput.features)."
                )
            inputs = inputs.value if path.blocked_input else inputs.to_host()
        elif path.blocked_input:  # plain NCHW features (not from the fast path): contract graph
            run, block, int8 = self.plain[k].run, 0, None
        io = self.stage_io[k]
        feeds = {io.inputs[0]: inputs} if k == 0 else {io.inputs[0]: inputs, io.inputs[1]: keep}
        outs = run(io.fetched, feeds, self.run_options)
        if io.last:
            return StageOutput(None, outs[0], outs[1])
        if block:
            feats = BlockedFeatures(outs[0], path.channels, block, k)
        elif int8 is not None:
            feats = QuantizedFeatures(outs[0], int8, k)
        else:
            feats = outs[0]
        return StageOutput(feats, outs[1], outs[2])

    def merge_features(self, parts: Sequence[tuple[Any, np.ndarray]]) -> Any | None:
        """Rows of several stage outputs as one handle (blocked features stay blocked)."""
        first = parts[0][0]
        if isinstance(first, BlockedFeatures) and all(
                isinstance(f, BlockedFeatures) and f.stage == first.stage and f.block == first.block
                for f, _ in parts):
            value = np.concatenate([f.value[keep] for f, keep in parts])
            return BlockedFeatures(value, first.channels, first.block, first.stage)
        if isinstance(first, QuantizedFeatures) and all(
                isinstance(f, QuantizedFeatures) and f.stage == first.stage and f.out == first.out
                for f, _ in parts):
            return QuantizedFeatures(np.concatenate([f.value[keep] for f, keep in parts]),
                                     first.out, first.stage)
        return super().merge_features(parts)

    def run_contract(self, k: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of stage ``k``'s graph as exported (no fused or composed path)."""
        io = self.stage_io[k]
        outs = self.plain[k].run(io.outputs, feeds, self.run_options)
        return dict(zip(io.outputs, outs, strict=True))

    def _full_model(self) -> tuple[Run, str, Any]:
        """``(run, input name, session)`` of ``full.onnx``, created on first use."""
        if self._full is None:
            sess = self._session(str(self.bundle.full_file()), spinning=self.alone_spinning)
            self._full = (direct_run(sess), sess.get_inputs()[0].name, sess)
        return self._full

    @property
    def full_session(self) -> Any:
        """The session of ``full.onnx`` (created on first use)."""
        return self._full_model()[2]

    def run_full(self, images: np.ndarray) -> np.ndarray:
        run, name, _ = self._full_model()
        return run(CONTRACT.full_outputs, {name: images}, self.run_options)[0]

    def describe(self) -> str:
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        one, calls = self.one_session, self._calls_spinning
        spins = [(calls, "in the session of batch 1 and the chain" if one
                  else "in one-session calls")]
        if self.one_session_spinning != calls:
            spins.append((self.one_session_spinning, "with every gate off"))
        alone = ", ".join(f"{_SPIN_WORDS[v]} {where}" for v, where in spins
                          if v != self.spinning)
        pool = (f"{self.threads} threads, spinning {_SPIN_WORDS[self.spinning]}"
                + (f" ({alone})" if alone else "") if self.shared_pool is None else
                f"one shared pool of {self.threads} threads, spinning as ORT's default")
        single = "on (batch 1), in the chain's session" if one else self.if_graph
        return (
            f"onnxruntime ({', '.join(wanted)}; {pool}; "
            f"fused boundaries {self.fusion}; chain {self.composition}; "
            f"in-graph exits {single})"
        )

    @property
    def _calls_spinning(self) -> bool | str:
        """The spinning of the sessions batch 1 and the chain run on."""
        return self.one_session_spinning if self.one_session else self.alone_spinning

    def spins_after_run(self, every_gate_off: bool) -> bool:
        """Whether the sessions a call takes keep spinning after it (ORT's default): with
        every gate off, the chain without gates; else batch 1 and the chain."""
        calls = self.one_session_spinning if every_gate_off else self._calls_spinning
        return self.spinning is True or calls is True


_FUSED, _CHAIN, _IF = "fused boundaries", "chain", "in-graph exits"
_MERGED = "one session for batch 1 and the chain"
#: the one-call paths, as :meth:`OnnxRuntimeBackend._one_call_session` names them
_SINGLE, _CHAIN_KIND = "single", "chain"
_COMPOSE = {_SINGLE: compose_if, _CHAIN_KIND: compose_chain}
_WHAT = {_SINGLE: "If graph", _CHAIN_KIND: "composed graph"}
_NO_OPTIMIZED = "ONNX Runtime wrote no optimized stage graphs"


def _check_shared(pool: int, threads: int | None, spinning: Any, alone_spinning: Any) -> None:
    """Refuse per-session thread settings in a process that shares one pool."""
    wrong = [f"{name}={value!r}" for name, value in (("spinning", spinning),
                                                     ("alone_spinning", alone_spinning))
             if value is not None]
    if threads and threads != pool:
        wrong.insert(0, f"threads={threads}")
    if wrong:
        raise BackendOptionError(
            f"got {', '.join(wrong)}, but this process runs every ONNX Runtime session on one "
            f"shared pool of {pool} threads (share_thread_pool), which has its own size and "
            "spins as ORT's default; per-session settings cannot apply. Fix: leave them unset, "
            "or run without share_thread_pool")


def _settled(why_not: FastPath | None, wanted: bool | None, option: str,
             on: FastPath) -> FastPath:
    """A fast path's state: ``on``, or why it is off (an error when the caller asked for it
    with ``option=True``)."""
    if why_not and wanted:
        raise BackendUnavailableError(
            f"{option}=True was requested but {why_not.detail}. Fix: pass {option}=None (use "
            "it when possible) or False."
        )
    return why_not or on


def _fusion_unavailable(cpu_only: bool, wanted: bool | None) -> FastPath | None:
    """Why the fused boundaries cannot be used here (None: they can)."""
    if wanted is False:
        return FastPath.by_choice(_FUSED, "disabled (fuse_boundaries=False)")
    if not cpu_only:
        return FastPath.by_choice(_FUSED, "only for the CPU execution provider")
    try:
        import onnx  # noqa: F401
    except ImportError:
        return FastPath.failed(_FUSED, "the onnx package is not installed (pip install onnx)")
    return None


def direct_run(sess: Any) -> Run:
    """The session's C++ ``run`` (no per-call Python validation) when reachable."""
    inner = getattr(sess, "_sess", None)
    if inner is not None and callable(getattr(inner, "run", None)):
        return inner.run

    def run(names: Any, feeds: dict[str, Any], options: Any) -> Any:  # pragma: no cover
        return sess.run(names, feeds, options)

    return run


def _load_models(folder: Path, n: int) -> list[Any] | None:
    """The optimized stage graphs ORT wrote into ``folder`` (None if any is missing)."""
    import onnx

    paths = [folder / f"stage{k}.onnx" for k in range(n)]
    return [onnx.load(str(p)) for p in paths] if all(p.is_file() for p in paths) else None


def _copy(model: Any) -> Any:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def check_fused(plain: list[StagePath], fused_runs: list[Run], fused: FusedStages,
                stage_io: list[Any], options: Any, sample_shape: Sequence[int]) -> list[int]:
    """Run the plain and the rewritten chains on random rows; return each blocked output's
    block size. Raises :class:`FusionError` when they disagree beyond float noise."""
    blocks = [0] * len(fused_runs)

    def features(k: int, p_feats: np.ndarray, f_feats: np.ndarray) -> None:
        out = fused.blocked_output[k]
        if out is not None:
            blocks[k] = _find_block(f_feats, p_feats, out.channels, out.padded)
            if not blocks[k]:
                raise FusionError(f"self-check failed: stage {k} features differ")

    check_paths(plain, fused_runs, stage_io, options, sample_shape, features)
    return blocks


def check_paths(plain: list[StagePath], fused_runs: list[Run], stage_io: list[Any],
                options: Any, sample_shape: Sequence[int],
                features: Callable[[int, np.ndarray, np.ndarray], None]) -> None:
    """Run the plain and the rewritten chains on random rows (subset, unordered, repeated
    ``keep``); every output but the features within float noise of the plain one, the
    features checked by ``features(k, plain, rewritten)``. Raises :class:`FusionError`."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, *sample_shape)).astype(np.float32)
    p_feats = f_feats = x
    for k, io in enumerate(stage_io):
        m = len(p_feats)
        keep = np.array([m - 1, 0, m // 2, m // 2], np.int64)  # subset, unordered, repeated
        feeds_p = {io.inputs[0]: p_feats} if k == 0 else {io.inputs[0]: p_feats, io.inputs[1]: keep}
        feeds_f = {io.inputs[0]: f_feats} if k == 0 else {io.inputs[0]: f_feats, io.inputs[1]: keep}
        p = plain[k].run(io.fetched, feeds_p, options)
        f = fused_runs[k](io.fetched, feeds_f, options)
        for name, a, b in zip(io.fetched, p, f, strict=True):
            if name == CONTRACT.features:
                continue
            why = close_to_reference(a, b, name)
            if why:
                raise FusionError(f"self-check failed: stage {k} output {name!r} {why}")
        if not io.last:
            p_feats, f_feats = p[0], f[0]
            features(k, p_feats, f_feats)


def _find_block(blocked: np.ndarray, plain: np.ndarray, channels: int, padded: int) -> int:
    """The NCHWc block size that maps ``blocked`` back to ``plain`` (0 if none does)."""
    cp = blocked.shape[1] if blocked.ndim >= 2 else 0
    if blocked.shape[0] != plain.shape[0] or (padded and cp != padded):
        return 0
    for b in (16, 8, 4, 32, 64):
        if cp % b:
            continue
        host = BlockedFeatures(blocked, channels, b, 0).to_host()
        if host.shape == plain.shape and not close_to_reference(plain, host, CONTRACT.features):
            return b
    return 0
