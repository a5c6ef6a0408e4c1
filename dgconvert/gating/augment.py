"""Training-time image augmentation shared by the reference training and GaterNet fitting."""

from __future__ import annotations

import torch
from torch import nn


def random_crop_flip(x: torch.Tensor, pad: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of uint8 ``[B, C, H, W]``."""
    b, c, h, w = x.shape
    if pad > 0:
        wp = w + 2 * pad
        flat = nn.functional.pad(x, (pad, pad, pad, pad)).reshape(b, c, -1)
        dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=gen)
        rows = dy + torch.arange(h)[None, :, None]  # [B, H, 1]
        cols = dx + torch.arange(w)[None, None, :]  # [B, 1, W]
        idx = (rows * wp + cols).reshape(b, 1, h * w).expand(b, c, h * w)
        x = torch.gather(flat, 2, idx).reshape(b, c, h, w)
    if hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x
