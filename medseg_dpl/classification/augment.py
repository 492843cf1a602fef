"""Weak and strong augmentations (FixMatch style), batched torch ops on the images' device.

Input and output: float ``(B, C, H, W)`` in [0, 1]; every sample draws its own parameters.
Two families:

- ``"digits"`` (8x8 hand-written digits, dark background): no flips (a flipped 2 is not a 2).
  Weak = shift by up to 1 pixel. Strong = random affine (rotation, scale, shear, shift),
  random contrast/brightness/gamma/noise and a cut-out square.
- ``"natural"`` (photos from an image folder): weak = random resized crop + horizontal flip;
  strong = the same plus colour jitter, random grayscale, blur and cut-out (RandAugment-like).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _u(n: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, device=like.device, dtype=torch.float32) * (hi - lo) + lo


def _view(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def affine(x: torch.Tensor, theta: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Resample ``x`` with per-sample ``theta`` ``(B, 2, 3)`` (output->input, normalised coords)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _shift_theta(b: int, max_px: float, size: int, like: torch.Tensor,
                 integer: bool = True) -> torch.Tensor:
    t = _u(b * 2, -max_px, max_px, like).view(b, 2)
    if integer:
        t = torch.round(t)
    theta = torch.zeros(b, 2, 3, device=like.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = t * 2.0 / size  # one pixel is 2/size in normalised coordinates
    return theta


def weak_digits(x: torch.Tensor) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel in x and y (zero = background fill)."""
    return affine(x, _shift_theta(x.shape[0], 1.49, x.shape[-1], x))


def strong_digits(x: torch.Tensor) -> torch.Tensor:
    """Random affine + photometric jitter + noise + a 3x3 (of 8x8) cut-out, per sample."""
    b, size = x.shape[0], x.shape[-1]
    ang = _u(b, -25, 25, x) * math.pi / 180
    scale = _u(b, 0.8, 1.2, x)
    shear = _u(b, -0.3, 0.3, x)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3, device=x.device)
    # output->input map: rotation · shear, divided by the zoom
    theta[:, 0, 0] = cos / scale
    theta[:, 0, 1] = (-sin + shear * cos) / scale
    theta[:, 1, 0] = sin / scale
    theta[:, 1, 1] = (cos + shear * sin) / scale
    theta[:, :, 2] = _u(b * 2, -1.5, 1.5, x).view(b, 2) * 2.0 / size
    out = affine(x, theta)
    # photometric: gamma, contrast, brightness; each with probability 1/2
    on = lambda: _view((torch.rand(b, device=x.device) < 0.5).float())  # noqa: E731
    gamma = _view(_u(b, 0.5, 1.8, x))
    out = torch.lerp(out, out.clamp_min(0).pow(gamma), on())
    contrast = _view(_u(b, 0.5, 1.5, x))
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = torch.lerp(out, (out - mean) * contrast + mean, on())
    out = out + on() * _view(_u(b, -0.25, 0.25, x))
    out = out + on() * torch.randn_like(out) * 0.1
    return cutout(out.clamp(0, 1), max(1, round(size * 3 / 8)))


def cutout(x: torch.Tensor, side: int, value: float = 0.5) -> torch.Tensor:
    """Fill one ``side`` x ``side`` square per sample (random centre, may cross the border)."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), device=x.device).view(b, 1, 1)
    cx = torch.randint(0, w, (b,), device=x.device).view(b, 1, 1)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    half = side // 2
    box = ((ys - cy).abs() <= half) & ((xs - cx).abs() <= half)
    if side % 2 == 0:  # even side: drop the last row/column of the (side+1) box
        box &= (ys - cy < half) & (xs - cx < half)
    return torch.where(box.unsqueeze(1), torch.full_like(x, value), x)


def _resized_crop_theta(b: int, like: torch.Tensor, scale=(0.35, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    area = _u(b, *scale, like)
    logr = _u(b, math.log(ratio[0]), math.log(ratio[1]), like)
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, device=like.device) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, device=like.device) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(b, device=like.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=like.device)
    theta[:, 0, 0] = w * flip
    theta[:, 1, 1] = h
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def weak_natural(x: torch.Tensor) -> torch.Tensor:
    """Random resized crop (35-100 % of the area) and horizontal flip."""
    return affine(x, _resized_crop_theta(x.shape[0], x), padding="reflection")


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True).expand_as(x)
    return x


def strong_natural(x: torch.Tensor) -> torch.Tensor:
    """Weak crop/flip + brightness/contrast/saturation jitter, grayscale (p=0.2), blur (p=0.5),
    cut-out of a quarter of the side."""
    b = x.shape[0]
    out = weak_natural(x)
    out = out * _view(_u(b, 0.6, 1.4, x))
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * _view(_u(b, 0.6, 1.4, x)) + mean
    g = _gray(out)
    out = torch.lerp(g, out, _view(_u(b, 0.6, 1.4, x)))
    out = torch.lerp(out, _gray(out), _view((torch.rand(b, device=x.device) < 0.2).float()))
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=out.dtype)
    k = (k[:, None] * k[None, :] / 16.0).expand(out.shape[1], 1, 3, 3)
    blurred = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), k, groups=out.shape[1])
    out = torch.lerp(out, blurred, _view((torch.rand(b, device=x.device) < 0.5).float()))
    return cutout(out.clamp(0, 1), max(1, x.shape[-1] // 4))


AUGMENTATIONS = {"digits": (weak_digits, strong_digits), "natural": (weak_natural, strong_natural)}


def augmentations(kind: str):
    """``(weak, strong)`` for ``"digits"`` or ``"natural"``."""
    try:
        return AUGMENTATIONS[kind]
    except KeyError:
        raise ValueError(f"unknown augmentation family {kind!r} ({', '.join(AUGMENTATIONS)})")
