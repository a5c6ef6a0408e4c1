"""Gate training losses (torch).

- :func:`ovr_hinge` — the d-gate paper's one-vs-all hinge loss (eq. 1–3): with
  ``d = Wx − b`` and ``s_ic = +1`` for the true class, ``−1`` otherwise,
  ``mean_i Σ_c max(0, 1 − s_ic d_ic)``. A sample is "outside the margin" for class c when
  ``s_ic d_ic ≥ 1``, so ``max_c d_ic ≥ 1`` means the gate is sure of one class.
- :func:`crammer_singer_hinge` — the multi-class hinge of Crammer & Singer:
  ``mean_i max(0, 1 + max_{c≠y} d_ic − d_iy)``.
- :func:`*_subgradient` — the sub-gradients of both (eq. 2) w.r.t. ``W`` and ``b``, written
  out by hand; the fitting code uses autograd, and the tests check that both agree.
- :func:`eenet_lv2` — EENets' cost-aware loss ``L_v2`` (thesis eq. 6, 7, 11): cumulative
  predictions ``Ŷ_n = h_n ŷ_n + (1 − h_n) Ŷ_{n+1}`` and costs
  ``C_n = h_n c_n + (1 − h_n) C_{n+1}``, summed as ``Σ_n CE(y, Ŷ_n) + λ C_n``.

The L2 term of the paper's objective (``λ‖w‖²``) is :func:`l2_penalty` (``λ/2 ‖W‖²``), kept
apart so the data terms stay comparable across ``λ``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _signs(y: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """``+1`` at the true class, ``−1`` elsewhere: ``[N, C]``."""
    s = torch.full((len(y), num_classes), -1.0, dtype=like.dtype, device=like.device)
    s[torch.arange(len(y), device=like.device), y] = 1.0
    return s


def ovr_hinge(d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One-vs-all hinge loss of distances ``d [N, C]`` and int labels ``y [N]`` (mean over N,
    sum over classes)."""
    s = _signs(y, d.shape[1], d)
    # relu, not clamp: its sub-gradient at the kink (s·d = 1) is 0, as in eq. 2
    return torch.relu(1.0 - s * d).sum(dim=1).mean()


def crammer_singer_hinge(d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Crammer–Singer multi-class hinge: ``mean_i max(0, 1 + max_{c≠y} d_ic − d_iy)``."""
    rows = torch.arange(len(y), device=d.device)
    true = d[rows, y]
    others = d.clone()
    others[rows, y] = float("-inf")
    return torch.relu(1.0 + others.max(dim=1).values - true).mean()


def l2_penalty(weight: torch.Tensor, strength: float) -> torch.Tensor:
    """``strength / 2 · ‖W‖²`` (the bias is not regularised)."""
    return 0.5 * strength * (weight * weight).sum()


def ovr_hinge_subgradient(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-gradient of :func:`ovr_hinge` for ``d = x Wᵀ + bias`` (``nn.Linear`` layout:
    ``W [C, F]``; the paper's ``−b`` is ``bias``). Per active term (``s·d < 1``):
    ``∂/∂W_c = −s x`` and ``∂/∂bias_c = −s`` (eq. 2), averaged over the batch."""
    d = x @ weight.T + bias
    s = _signs(y, weight.shape[0], d)
    g = torch.where(s * d < 1.0, -s, torch.zeros_like(s)) / len(y)  # dL/dd
    return g.T @ x, g.sum(dim=0)


def crammer_singer_subgradient(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-gradient of :func:`crammer_singer_hinge`: for a sample inside the margin,
    ``+x`` on the strongest wrong class's row and ``−x`` on the true class's row."""
    d = x @ weight.T + bias
    rows = torch.arange(len(y))
    others = d.clone()
    others[rows, y] = float("-inf")
    rival = others.argmax(dim=1)
    active = (1.0 + others[rows, rival] - d[rows, y]) > 0
    g = torch.zeros_like(d)
    g[rows[active], rival[active]] += 1.0
    g[rows[active], y[active]] -= 1.0
    g /= len(y)
    return g.T @ x, g.sum(dim=0)


def eenet_lv2(
    probs: Sequence[torch.Tensor],
    confidences: Sequence[torch.Tensor],
    costs: Sequence[float],
    y: torch.Tensor,
    cost_weight: float = 1.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """EENets' ``L_v2`` (mean over the batch).

    ``probs``: K+1 class-probability tensors ``[N, C]`` (K early exits, then the final
    classifier); ``confidences``: K tensors ``h_n [N]`` in ``[0, 1]``; ``costs``: K+1
    cumulative cost fractions ``c_n`` (``c_K`` is the whole model, usually 1).
    """
    k = len(confidences)
    if len(probs) != k + 1 or len(costs) != k + 1:
        raise ValueError(
            f"eenet_lv2 got {len(probs)} prediction tensors, {k} confidences and "
            f"{len(costs)} costs; expected K+1, K and K+1 (the final exit has no confidence)"
        )
    rows = torch.arange(len(y), device=y.device)
    big_y = probs[k]
    big_c = torch.full_like(big_y[:, 0], float(costs[k]))
    total = -torch.log(big_y[rows, y].clamp_min(eps)) + cost_weight * big_c
    for n in range(k - 1, -1, -1):
        h = confidences[n].reshape(-1)
        big_y = h[:, None] * probs[n] + (1.0 - h[:, None]) * big_y
        big_c = h * float(costs[n]) + (1.0 - h) * big_c
        total = total - torch.log(big_y[rows, y].clamp_min(eps)) + cost_weight * big_c
    return total.mean()
