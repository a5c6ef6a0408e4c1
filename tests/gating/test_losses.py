"""Gate losses against hand-computed values (d-gate hinge, Crammer–Singer, EENet L_v2)."""

from __future__ import annotations

import math

import pytest
import torch

from dgconvert.gating.losses import (
    crammer_singer_hinge,
    crammer_singer_subgradient,
    eenet_lv2,
    l2_penalty,
    ovr_hinge,
    ovr_hinge_subgradient,
)

# Two samples, two features, three classes: d = x Wᵀ + b.
X = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
B = torch.tensor([0.0, -1.0, 0.5])
Y = torch.tensor([1, 0])
# d = [[1, 1, -0.5], [0.5, -2, 2]]


def test_distances_fixture() -> None:
    d = X @ W.T + B
    assert torch.equal(d, torch.tensor([[1.0, 1.0, -0.5], [0.5, -2.0, 2.0]]))


def test_ovr_hinge_hand_computed() -> None:
    d = X @ W.T + B
    # sample 0 (y=1): class0 s=-1: max(0,1+1)=2; class1 s=+1: max(0,1-1)=0; class2: max(0,1-0.5)=0.5
    # sample 1 (y=0): class0 s=+1: 1-0.5=0.5; class1 s=-1: 1-2<0 -> 0; class2 s=-1: 1+2=3
    assert ovr_hinge(d, Y).item() == pytest.approx((2.0 + 0.5 + 0.5 + 3.0) / 2)


def test_ovr_hinge_is_zero_outside_the_margin() -> None:
    d = torch.tensor([[-1.0, 1.0, -3.0]])  # true class at +1, others at <= -1: all outside
    assert ovr_hinge(d, torch.tensor([1])).item() == 0.0
    d = torch.tensor([[-1.0, 0.99, -3.0]])  # true class just inside the margin
    assert ovr_hinge(d, torch.tensor([1])).item() == pytest.approx(0.01)


def test_ovr_subgradient_hand_computed_and_matches_autograd() -> None:
    gw, gb = ovr_hinge_subgradient(X, W, B, Y)
    # dL/dd (before /n): sample 0: [+1, 0 (s·d = 1 is not < 1), +1]; sample 1: [-1, 0, +1]
    g = torch.tensor([[1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]]) / 2
    assert torch.allclose(gw, g.T @ X)
    assert torch.allclose(gb, g.sum(0))
    # by hand: row 0 = (x0 - x1)/2 = [0.25, 1.5]; row 1 = 0; row 2 = (x0 + x1)/2 = [0.75, 0.5]
    assert torch.allclose(gw, torch.tensor([[0.25, 1.5], [0.0, 0.0], [0.75, 0.5]]))
    w, b = W.clone().requires_grad_(True), B.clone().requires_grad_(True)
    ovr_hinge(X @ w.T + b, Y).backward()
    assert torch.allclose(w.grad, gw) and torch.allclose(b.grad, gb)


def test_crammer_singer_hand_computed() -> None:
    d = X @ W.T + B
    # sample 0: true d=1, best rival max(1, -0.5)=1 -> 1 + 1 - 1 = 1
    # sample 1: true d=0.5, best rival max(-2, 2)=2 -> 1 + 2 - 0.5 = 2.5
    assert crammer_singer_hinge(d, Y).item() == pytest.approx((1.0 + 2.5) / 2)
    ok = torch.tensor([[0.0, 2.0, 1.0]])  # margin exactly 1: no loss
    assert crammer_singer_hinge(ok, torch.tensor([1])).item() == 0.0


def test_crammer_singer_subgradient_hand_computed_and_matches_autograd() -> None:
    gw, gb = crammer_singer_subgradient(X, W, B, Y)
    # sample 0: rival class 0 (first max), true 1 -> +x0 on row 0, -x0 on row 1
    # sample 1: rival class 2, true 0 -> +x1 on row 2, -x1 on row 0
    expected_w = torch.tensor([[1.0 - 0.5, 2.0 + 1.0], [-1.0, -2.0], [0.5, -1.0]]) / 2
    assert torch.allclose(gw, expected_w)
    assert torch.allclose(gb, torch.tensor([0.0, -1.0, 1.0]) / 2)
    w, b = W.clone().requires_grad_(True), B.clone().requires_grad_(True)
    # autograd picks the same rival (torch.max returns the first maximum)
    crammer_singer_hinge(X @ w.T + b, Y).backward()
    assert torch.allclose(w.grad, gw) and torch.allclose(b.grad, gb)


def test_l2_penalty() -> None:
    assert l2_penalty(W, 0.1).item() == pytest.approx(0.5 * 0.1 * 4.0)  # ‖W‖² = 4


def test_eenet_lv2_tiny_case_by_hand() -> None:
    # one sample, two classes, two early exits + final (three exits), thesis eq. 12
    y = torch.tensor([0])
    p0, p1, p2 = (torch.tensor([[a, 1 - a]]) for a in (0.6, 0.8, 0.9))
    h0, h1 = torch.tensor([0.5]), torch.tensor([0.25])
    c = [0.1, 0.4, 1.0]
    lam = 0.5
    y1 = 0.25 * 0.8 + 0.75 * 0.9  # Ŷ_1[0] = 0.875
    y0 = 0.5 * 0.6 + 0.5 * y1  # Ŷ_0[0] = 0.7375
    c1 = 0.25 * 0.4 + 0.75 * 1.0  # C_1 = 0.85
    c0 = 0.5 * 0.1 + 0.5 * c1  # C_0 = 0.475
    expected = (
        -math.log(y0) + lam * c0 + -math.log(y1) + lam * c1 + -math.log(0.9) + lam * 1.0
    )
    got = eenet_lv2([p0, p1, p2], [h0, h1], c, y, cost_weight=lam)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_eenet_lv2_confidence_gradient_direction() -> None:
    # An exit that is right and cheap should be pushed to be confident; a wrong one not.
    y = torch.tensor([0])
    final = torch.tensor([[0.7, 0.3]])
    for p_exit, sign in ((torch.tensor([[0.99, 0.01]]), -1), (torch.tensor([[0.05, 0.95]]), 1)):
        h = torch.tensor([0.5], requires_grad=True)
        eenet_lv2([p_exit, final], [h], [0.2, 1.0], y, cost_weight=0.1).backward()
        assert math.copysign(1, h.grad.item()) == sign


def test_eenet_lv2_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="expected K\\+1, K and K\\+1"):
        eenet_lv2([torch.ones(1, 2)], [torch.ones(1)], [1.0], torch.tensor([0]))
