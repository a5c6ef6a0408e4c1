"""The stage-graph contract: the names, dtypes and batch axes of every stage graph's I/O.

Stage 0 takes ``images[N, ...]``; stage ``k >= 1`` takes ``x[N_prev, ...]`` (the previous
stage's features, uncompacted) and ``keep[M]`` (int64 row indices) and begins with
``Gather(x, keep, axis=0)``. A gated stage returns ``features``, ``score[M]`` (float32),
``label[M]`` (int64) and ``gate_logits[M, C]``; the last stage returns ``logits[M, C]``,
``label[M]`` and ``score[M]`` (max softmax probability, informational). ``full.onnx`` maps
``images`` to ``logits``.

Every exporter, verifier, backend and graph pass takes these names from :data:`CONTRACT`;
nothing else spells them out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageIO:
    """The I/O of one stage graph."""

    index: int
    last: bool
    inputs: tuple[str, ...]  # in graph order
    outputs: tuple[str, ...]  # everything the exported graph returns, in graph order
    fetched: tuple[str, ...]  # what the runtime asks for (features first when present)


@dataclass(frozen=True)
class StageGraphContract:
    """Names and dtypes of the stage graphs (one instance: :data:`CONTRACT`)."""

    images: str = "images"
    x: str = "x"
    keep: str = "keep"
    features: str = "features"
    score: str = "score"
    label: str = "label"
    logits: str = "logits"
    gate_logits: str = "gate_logits"
    score_dtype: str = "float32"
    label_dtype: str = "int64"
    keep_dtype: str = "int64"

    def inputs(self, k: int) -> tuple[str, ...]:
        """Input names of stage ``k``."""
        return (self.images,) if k == 0 else (self.x, self.keep)

    def outputs(self, k: int, num_stages: int) -> tuple[str, ...]:
        """Output names of stage ``k`` of a ``num_stages``-stage bundle, in graph order."""
        if self.is_last(k, num_stages):
            return (self.logits, self.label, self.score)
        return (self.features, self.score, self.label, self.gate_logits)

    def fetched(self, k: int, num_stages: int) -> tuple[str, ...]:
        """What the runtime fetches from stage ``k``: features (not after the last
        stage), then score and label."""
        tail = (self.score, self.label)
        return tail if self.is_last(k, num_stages) else (self.features, *tail)

    def stage(self, k: int, num_stages: int) -> StageIO:
        """The whole I/O description of stage ``k``."""
        if not 0 <= k < num_stages:
            raise IndexError(f"stage {k} of a {num_stages}-stage bundle")
        return StageIO(k, self.is_last(k, num_stages), self.inputs(k),
                       self.outputs(k, num_stages), self.fetched(k, num_stages))

    @staticmethod
    def is_last(k: int, num_stages: int) -> bool:
        return k == num_stages - 1

    @property
    def full_inputs(self) -> tuple[str, ...]:
        return (self.images,)

    @property
    def full_outputs(self) -> tuple[str, ...]:
        return (self.logits,)

    def batch_axis(self, name: str) -> str:
        """The symbolic batch dimension of a tensor: ``M`` for ``keep`` and every output of
        a stage ``k >= 1`` (the caller decides), ``N`` otherwise."""
        return "M" if name == self.keep else "N"

    def logits_of(self, names: tuple[str, ...] | list[str]) -> str:
        """The logits output among ``names`` (``gate_logits`` of a gated stage, else
        ``logits``): what a label's ties are judged on."""
        return self.gate_logits if self.gate_logits in names else self.logits


CONTRACT = StageGraphContract()
