"""ONNX Runtime backend: one ``InferenceSession`` per stage, tuned for chaining them.

What costs time when a gated network runs as a chain of sessions on a CPU, and what this
backend does about it (measured with ``dgconvert bench`` and ORT's per-node profiler on a
2-core Xeon; see ``benchmarks/README.md``):

Thread pools (``threads``, ``spinning``). Each session owns an intra-op pool. With ORT's
default *spinning* workers the pools of the stages that are not running keep spinning and
steal the cores from the stage that is: the staged chain measured 2-3x slower than the
full model. Spinning is therefore off by default (``session.intra_op.allow_spinning = 0``)
and graphs run sequentially. ``spinning="run"`` lets workers spin between the operators of
one run and stops them when it ends (``session.force_spinning_stop``): on an otherwise idle
machine it cut batch-1 latency by about a fifth for the full model and the chain alike,
but with other processes on the cores it was 2-4x slower, so it is opt-in.
``spinning=True`` restores ORT's default. ONNX Runtime 1.31's
Python API does expose one *global* pool shared by all sessions
(``onnxruntime.set_global_thread_pool_sizes`` + ``SessionOptions.use_per_session_threads =
False``), but that pool always spins (its spin control is not exposed to Python), it must
exist before any session of the process, and every later session that sets its own thread
count then fails; it measured slower here, so it is not used.

Stage boundaries (``fuse_boundaries``). On x86 ORT rewrites convolutions to its blocked
``NCHWc`` layout, so a stage graph ends with ``ReorderOutput`` (blocked -> NCHW) and the next
begins with ``Gather`` + ``ReorderInput`` (NCHW -> blocked): two extra copies of the features
per boundary, plus the gate head's pooling over the NCHW copy. With ``fuse_boundaries``
(default: on for the CPU execution provider when the ``onnx`` package is importable) the
backend takes ORT's own optimized stage graphs and rewires them so the features cross the
boundary in the blocked layout: the reorders disappear, ``Gather`` works on the blocked rows
(batch stays the outermost axis), and the gate pools with ORT's NCHWc
``GlobalAveragePool``. The rewritten graphs are checked against the plain ones on random
inputs when the backend is created; on any mismatch (or an unrecognised graph) the plain
graphs are used. ``StageOutput.features`` is then a :class:`BlockedFeatures` handle whose
``to_host()`` / ``np.asarray()`` gives the contract's NCHW array. ``describe()`` says which
boundaries are fused. ``_sessions`` always holds the plain contract sessions.

One session for the chain (``compose``). By default the (fused) optimized stage graphs are
also composed into one graph that runs every stage in one call, thresholds as an input and
compaction inside (:mod:`dgconvert.runtime.onnxruntime_chain`): no session call per stage,
and each stage's last convolution accumulates the residual in place again (as a graph
output it could not: 15-20 % slower). Self-checked against the stage sessions at creation;
``chain()`` offers it to the runner, which uses it from batch 2 up (at batch 1 the stage
sessions, which stop at the exit, are faster).

Calls. ``run_stage`` calls the session's C++ ``run`` directly, skipping the Python
wrapper's per-call input validation (the runner already validated the batch). Outputs are
not copied: ORT hands back numpy arrays over its own buffers (checked: ``run`` and
``run_with_ort_values`` cost the same), and a numpy input is wrapped without a copy, so
I/O binding or pre-allocated outputs buy nothing on the CPU.

Threading docs: https://onnxruntime.ai/docs/performance/tune-performance/threading.html
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dgconvert.bundle import Bundle
from dgconvert.errors import BackendUnavailableError, InputError
from dgconvert.runtime.base import Backend, StageOutput
from dgconvert.runtime.onnxruntime_chain import ChainError, ChainSession, check_chain, compose_chain

NCHWC = "com.microsoft.nchwc"


def default_threads() -> int:
    """Cores this process may use (respects CPU affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


SPINNING = (False, "run", True)


class BackendOptionError(BackendUnavailableError, ValueError):
    """A backend option has a value the backend does not know."""


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
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    flag = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    if spinning == "run":
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    return so


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


class OnnxRuntimeBackend(Backend):
    """Runs each stage graph with ONNX Runtime (CPU by default, providers configurable).

    ``threads``: intra-op threads per session (default: all usable cores). ``spinning``:
    ``False``, ``"run"`` or ``True`` (see :func:`session_options` and the module docstring).
    ``fuse_boundaries``: keep features in ORT's blocked layout between stages (``None`` =
    when possible: CPU execution provider only, ``onnx`` installed, graphs recognised and
    self-checked). ``compose``: also build the one-session chain offered by :meth:`chain`
    (``None`` = when possible and self-checked; ``False`` = stage sessions only).
    """

    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        threads: int | None = None,
        spinning: bool | str = False,
        fuse_boundaries: bool | None = None,
        compose: bool | None = None,
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
        self.threads = threads or default_threads()
        self.spinning = spinning
        so = session_options(self.threads, spinning)
        self._so = so
        self._full: Any | None = None
        last = bundle.num_stages - 1
        self._wanted = [
            ["features", "score", "label"] if k < last else ["score", "label"]
            for k in range(bundle.num_stages)
        ]
        cpu_only = wanted == ["CPUExecutionProvider"]
        why_not = self._fusion_unavailable(cpu_only, fuse_boundaries)
        if why_not and fuse_boundaries:
            raise BackendUnavailableError(
                f"fuse_boundaries=True was requested but {why_not}. Fix: pass "
                "fuse_boundaries=None (use it when possible) or False."
            )
        # ORT's optimized stage graphs feed the boundary fusion and the one-session chain
        not_optimizable = self._fusion_unavailable(cpu_only, None)
        wants_graphs = not not_optimizable and (not why_not or compose is not False)
        tmp = tempfile.TemporaryDirectory(prefix="dgconvert-ort-") if wants_graphs else None
        self._sessions = []
        for k in range(bundle.num_stages):
            opts = so
            if tmp is not None:  # ORT writes its optimized graph as a by-product
                opts = session_options(self.threads, spinning)
                opts.optimized_model_filepath = str(Path(tmp.name) / f"stage{k}.onnx")
            self._sessions.append(
                ort.InferenceSession(str(bundle.stage_file(k)), opts, providers=self.providers)
            )
        self._inputs = [[i.name for i in s.get_inputs()] for s in self._sessions]
        self._runs = [_direct_run(s) for s in self._sessions]
        self._plain = [(run, False, 0, 0) for run in self._runs]
        self._run_options = ort.RunOptions()
        # fast path: per stage (run, input is blocked, output block size or 0)
        self._fast: list[tuple[Any, bool, int, int]] | None = None
        self.fusion = f"off: {why_not}" if why_not else "off"
        chain_models = None
        if tmp is not None:
            with tmp:
                if not why_not:
                    try:
                        self._fast, self.fusion, chain_models = _build_fused(self, Path(tmp.name))
                    except _FusionError as exc:
                        self.fusion = f"off: {exc}"
                if chain_models is None and compose is not False:
                    chain_models = _optimized_models(Path(tmp.name), bundle.num_stages)
            if self._fast is None and fuse_boundaries:
                raise BackendUnavailableError(
                    f"fuse_boundaries=True was requested but {self.fusion}. Fix: pass "
                    "fuse_boundaries=None or False."
                )
        self._chain: ChainSession | None = None
        self.composition = self._compose(compose, chain_models, not_optimizable)

    def _compose(self, wanted: bool | None, models: list[Any] | None, why_not: str) -> str:
        """Build the one-session chain (:mod:`.onnxruntime_chain`) from ORT's optimized
        stage graphs (boundaries fused when they are); ``why_not``: why there are no
        optimized graphs to build it from, if so. Say what was done."""
        if wanted is False:
            return "off (compose=False)"
        if not why_not and self.bundle.num_stages < 2:
            why_not = "a single stage has nothing to chain"
        if not why_not and models is None:
            why_not = "ONNX Runtime wrote no optimized stage graphs"
        if not why_not:
            try:
                self._chain = _build_chain(self, models)  # type: ignore[arg-type]
            except ChainError as exc:
                why_not = str(exc)
        if why_not and wanted:
            raise BackendUnavailableError(
                f"compose=True was requested but {why_not}. Fix: pass compose=None (use it "
                "when possible) or False."
            )
        return f"off: {why_not}" if why_not else "one session"

    def chain(self) -> Any:
        """``run(images, thresholds) -> [(score, label) per stage]`` of the one-session chain,
        or None when the stages run as separate sessions."""
        return None if self._chain is None else self._chain.run

    @staticmethod
    def _fusion_unavailable(cpu_only: bool, wanted: bool | None) -> str:
        if wanted is False:
            return "disabled (fuse_boundaries=False)"
        if not cpu_only:
            return "only for the CPU execution provider"
        try:
            import onnx  # noqa: F401
        except ImportError:
            return "the onnx package is not installed (pip install onnx)"
        return ""

    def run_stage(self, k: int, inputs: Any, keep: np.ndarray | None) -> StageOutput:
        run, blocked_in, block, channels = (self._fast or self._plain)[k]
        if inputs.__class__ is BlockedFeatures:
            if inputs.stage != k - 1:
                raise InputError(
                    f"stage {k} got the features of stage {inputs.stage}; expected those "
                    f"returned by stage {k - 1} of this backend (StageOutput.features)."
                )
            inputs = inputs.value if blocked_in else inputs.to_host()
        elif blocked_in:  # plain NCHW features (not from the fast path): contract graph
            run, block = self._runs[k], 0
        names = self._inputs[k]
        feeds = {names[0]: inputs} if k == 0 else {names[0]: inputs, names[1]: keep}
        outs = run(self._wanted[k], feeds, self._run_options)
        if len(outs) == 2:
            return StageOutput(None, outs[0], outs[1])
        feats = outs[0] if not block else BlockedFeatures(outs[0], channels, block, k)
        return StageOutput(feats, outs[1], outs[2])

    def run_full(self, images: np.ndarray) -> np.ndarray:
        if self._full is None:
            import onnxruntime as ort

            sess = ort.InferenceSession(
                str(self.bundle.full_file()), self._so, providers=self.providers
            )
            self._full = (_direct_run(sess), sess.get_inputs()[0].name,
                          [sess.get_outputs()[0].name], sess)
        run, name, outputs, _ = self._full
        return run(outputs, {name: images}, self._run_options)[0]

    def describe(self) -> str:
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        return (
            f"onnxruntime ({', '.join(wanted)}; {self.threads} threads, spinning "
            f"{ {False: 'off', 'run': 'within runs', True: 'on'}[self.spinning]}; "
            f"fused boundaries {self.fusion}; chain {self.composition})"
        )


def _direct_run(sess: Any) -> Any:
    """The session's C++ ``run`` (no per-call Python validation) when reachable."""
    inner = getattr(sess, "_sess", None)
    if inner is not None and callable(getattr(inner, "run", None)):
        return inner.run

    def run(names: Any, feeds: dict[str, Any], options: Any) -> Any:  # pragma: no cover
        return sess.run(names, feeds, options)

    return run


# -- boundary fusion ---------------------------------------------------------------------


class _FusionError(Exception):
    """The optimized graphs are not in the shape the rewrite expects."""


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _consumers(graph: Any, tensor: str) -> list[Any]:
    return [n for n in graph.node if tensor in n.input]


def _output_side(graph: Any) -> tuple[Any, int, int] | None:
    """``(ReorderOutput node, channels, padded channels)`` producing ``features``, if any."""
    prod = [n for n in graph.node if "features" in n.output]
    if len(prod) != 1 or prod[0].op_type != "ReorderOutput" or prod[0].domain != NCHWC:
        return None
    node = prod[0]
    if _attr(node, "channels_last", 0):
        return None
    src = [n for n in graph.node if node.input[0] in n.output]
    inits = {i.name: list(i.dims) for i in graph.initializer}
    padded = 0
    if len(src) == 1 and src[0].op_type == "Conv" and src[0].domain == NCHWC:
        padded = int((inits.get(src[0].input[1]) or [0])[0])
    return node, int(_attr(node, "channels")), padded


def _input_side(graph: Any) -> tuple[Any, list[Any]] | None:
    """``(Gather node, ReorderInput nodes after it)`` at the start of a stage, if any."""
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == "x"]
    if len(gathers) != 1 or _attr(gathers[0], "axis", 0) != 0:
        return None
    users = _consumers(graph, gathers[0].output[0])
    if not users or any(u.op_type != "ReorderInput" or u.domain != NCHWC
                        or _attr(u, "channels_last", 0) for u in users):
        return None
    return gathers[0], users


def _is_spatial_mean(graph: Any, node: Any) -> bool:
    """ReduceMean over axes (2, 3) of a 4-D tensor, keepdims=0."""
    if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
        return False
    if _attr(node, "keepdims", 1) != 0:
        return False
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1:
        from onnx import numpy_helper

        init = {i.name: i for i in graph.initializer}.get(node.input[1])
        axes = None if init is None else numpy_helper.to_array(init).tolist()
    return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]


def _rewrite_output(graph: Any, channels: int, padded: int, tag: str) -> None:
    """Make ``features`` the blocked tensor; gates pool it with NCHWc GlobalAveragePool."""
    from onnx import helper, numpy_helper

    node = next(n for n in graph.node if "features" in n.output)
    blocked = node.input[0]
    node.output[0] = "features_nchw"
    for n in graph.node:
        if n is not node:
            n.input[:] = ["features_nchw" if v == "features" else v for v in n.input]
    for n in graph.node:  # the blocked tensor becomes the graph output `features`
        n.input[:] = ["features" if v == blocked else v for v in n.input]
        n.output[:] = ["features" if v == blocked else v for v in n.output]
    for user in list(_consumers(graph, "features_nchw")):
        if not _is_spatial_mean(graph, user):
            continue
        at = list(graph.node).index(user)
        out = user.output[0]
        new = [helper.make_node("GlobalAveragePool", ["features"], [f"{tag}_gap"], domain=NCHWC),
               helper.make_node("Flatten", [f"{tag}_gap"],  # works on 0 rows too
                                [out if padded == channels else f"{tag}_flat"], axis=1)]
        if padded != channels:
            for nm, v in ((f"{tag}_s0", 0), (f"{tag}_sc", channels), (f"{tag}_ax", 1)):
                graph.initializer.append(numpy_helper.from_array(np.array([v], np.int64), nm))
            new.append(helper.make_node("Slice", [f"{tag}_flat", f"{tag}_s0", f"{tag}_sc",
                                                  f"{tag}_ax"], [out]))
        graph.node.remove(user)
        for j, nn in enumerate(new):
            graph.node.insert(at + j, nn)
    if not _consumers(graph, "features_nchw"):
        graph.node.remove(node)
    for o in graph.output:
        if o.name == "features":
            o.type.tensor_type.ClearField("shape")


def _rewrite_input(graph: Any) -> None:
    """Drop the ReorderInput after the Gather: ``x`` arrives blocked already."""
    gather, reorders = _input_side(graph)  # type: ignore[misc]
    for r in reorders:
        for n in graph.node:
            n.input[:] = [gather.output[0] if v == r.output[0] else v for v in n.input]
        graph.node.remove(r)
    for i in graph.input:
        if i.name == "x":
            i.type.tensor_type.ClearField("shape")


def _drop_keep_reshape(graph: Any) -> None:
    """``Reshape(keep, [-1])`` before the Gather is a no-op on the 1-D ``keep``: remove it."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    for n in list(graph.node):
        if n.op_type == "Reshape" and n.input[0] == "keep" and n.input[1] in inits:
            if numpy_helper.to_array(inits[n.input[1]]).tolist() != [-1]:
                continue
            for u in graph.node:
                u.input[:] = ["keep" if v == n.output[0] else v for v in u.input]
            graph.node.remove(n)


def _build_fused(
    be: OnnxRuntimeBackend, tmp: Path
) -> tuple[list[tuple[Any, bool, int, int]], str, list[Any]]:
    """Rewrite ORT's optimized stage graphs for blocked boundaries; self-check; load them.

    Returns the fast path per stage, a description and the rewritten models."""
    import onnx
    import onnxruntime as ort

    n = be.bundle.num_stages
    models = []
    for k in range(n):
        path = tmp / f"stage{k}.onnx"
        if not path.is_file():
            raise _FusionError(f"ONNX Runtime wrote no optimized graph for stage {k}")
        models.append(onnx.load(str(path)))
    outs = [_output_side(m.graph) for m in models[:-1]]
    ins = [None] + [_input_side(m.graph) for m in models[1:]]
    fused = [outs[k] is not None and ins[k + 1] is not None for k in range(n - 1)]
    if not any(fused):
        raise _FusionError("no stage boundary uses ORT's blocked layout (nothing to fuse)")
    info: list[tuple[int, int]] = [(0, 0)] * n  # (channels, padded) of stage k's output
    for k in range(n):
        g = models[k].graph
        if k > 0:
            _drop_keep_reshape(g)
            if fused[k - 1]:
                _rewrite_input(g)
        if k < n - 1 and fused[k]:
            _, channels, padded = outs[k]  # type: ignore[misc]
            _rewrite_output(g, channels, padded, f"dgc{k}")
            info[k] = (channels, padded)
    so = session_options(be.threads, be.spinning)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    sessions = [ort.InferenceSession(m.SerializeToString(), so, providers=be.providers)
                for m in models]
    runs = [_direct_run(s) for s in sessions]
    blocks = _self_check(be, runs, fused, info)
    fast = [(runs[k], k > 0 and fused[k - 1], blocks[k], info[k][0]) for k in range(n)]
    return fast, f"nchwc ({sum(fused)} of {n - 1} boundaries)", models


def _optimized_models(tmp: Path, n: int) -> list[Any] | None:
    """The optimized stage graphs ORT wrote into ``tmp`` (None if any is missing)."""
    import onnx

    paths = [tmp / f"stage{k}.onnx" for k in range(n)]
    return [onnx.load(str(p)) for p in paths] if all(p.is_file() for p in paths) else None


def _build_chain(be: OnnxRuntimeBackend, models: list[Any]) -> ChainSession:
    """Compose ORT's optimized stage graphs into one session; self-check it.

    The graphs are already optimized (this machine's blocked layout included), so the
    composed graph is loaded at the extended level: optimizing the whole chain again
    re-lays it out in ways that fail on empty batches (measured)."""
    import onnxruntime as ort

    try:
        composed = compose_chain(models)
    except (ValueError, KeyError, AttributeError) as exc:  # onnx on an unexpected graph
        raise ChainError(f"composing the stage graphs failed: {exc}") from exc
    so = session_options(be.threads, be.spinning)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    try:
        sess = ort.InferenceSession(composed.SerializeToString(), so, providers=be.providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ChainError(f"ONNX Runtime refused the composed graph: {exc}") from exc
    chain = ChainSession(sess, _direct_run(sess), be._run_options, be.bundle.num_stages)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, *be.bundle.input_shape)).astype(np.float32)
    check_chain(chain, be.run_stage, x)
    return chain


def _self_check(be: OnnxRuntimeBackend, runs: list[Any], fused: list[bool],
                info: list[tuple[int, int]]) -> list[int]:
    """Run plain and rewritten chains on random rows; return each fused output's block size."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, *be.bundle.input_shape)).astype(np.float32)
    opts, blocks = be._run_options, [0] * len(runs)
    plain = fast = x
    for k in range(len(runs)):
        names = be._inputs[k]
        want = be._wanted[k]
        m = len(plain)
        keep = np.array([m - 1, 0, m // 2, m // 2], np.int64)  # subset, unordered, repeated
        if k == 0:
            p = be._runs[0](want, {names[0]: x}, opts)
            f = runs[0](want, {names[0]: x}, opts)
        else:
            p = be._runs[k](want, {names[0]: plain, names[1]: keep}, opts)
            f = runs[k](want, {names[0]: fast, names[1]: keep}, opts)
        for name, a, b in zip(want, p, f, strict=True):
            if name == "features":
                continue
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=1e-5):
                raise _FusionError(f"self-check failed: stage {k} output {name!r} differs")
        if k < len(runs) - 1:
            plain, fast = p[0], f[0]
            if fused[k]:
                blocks[k] = _find_block(fast, plain, *info[k])
                if not blocks[k]:
                    raise _FusionError(f"self-check failed: stage {k} features differ")
    return blocks


def _find_block(blocked: np.ndarray, plain: np.ndarray, channels: int, padded: int) -> int:
    """The NCHWc block size that maps ``blocked`` back to ``plain`` (0 if none does)."""
    cp = blocked.shape[1] if blocked.ndim >= 2 else 0
    if blocked.shape[0] != plain.shape[0] or (padded and cp != padded):
        return 0
    for b in (16, 8, 4, 32, 64):
        if cp % b:
            continue
        host = BlockedFeatures(blocked, channels, b, 0).to_host()
        if host.shape == plain.shape and np.allclose(host, plain, rtol=1e-4, atol=1e-5):
            return b
    return 0
