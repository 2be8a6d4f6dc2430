"""Image operations for learned augmentation, differentiable in their magnitudes.

Every operation takes images x [N, C, H, W] (float) and per-image strengths as tensors, and is a
smooth function of those strengths, so a policy's magnitudes get gradients through it:

* **geometric** — rotation, translation, scaling, shearing — are 3×3 matrices in pixel coordinates
  centred on the image (u to the right, v down, in pixels). They compose by matrix product and are
  applied with one bilinear resampling (``torch.nn.functional.affine_grid`` / ``grid_sample``,
  Jaderberg et al. 2015, "Spatial transformer networks"): an output pixel at p reads the input at
  A⁻¹p, so content at p moves to A p. Outside the image reads as 0 (no ink).
* **elastic distortion** (Simard, Steinkraus & Platt 2003, "Best practices for convolutional neural
  networks applied to visual document analysis"): a random displacement field, uniform in [−1, 1]
  per pixel, smoothed by a Gaussian of width σ and scaled to α pixels (here: normalised to unit RMS
  first, so α is the RMS displacement in pixels); the output at p reads the input at p + α·d(p).
* **noise**: x + s·ε with a fixed ε ~ N(0, 1).
* **erasing** (Zhong et al. 2020, "Random erasing data augmentation"; DeVries & Taylor 2017,
  "Cutout"): x·(1 − w·M), M a box of side ``size`` around ``center``. The box has soft edges,
  M(u) = Π_axes σ((size/2 − |u − c|)/softness), so it is differentiable in its size; softness → 0
  is the hard box.

The randomness (angles' signs, the field, ε, the box centre) is passed in as tensors: the callers
draw it from an explicit ``torch.Generator`` (``metaphi.augment.policy.draw_noise``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(x: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"images must be float [N, C, H, W], got {x.dtype} {tuple(x.shape)}; "
                         "scale uint8 images with x.float() / 255 first")


def _per_image(value, n: int, like: Tensor) -> Tensor:
    v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return v.expand(n) if v.dim() == 0 else v


def _eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(3, dtype=like.dtype, device=like.device).expand(n, 3, 3).clone()


def _matrix(n: int, like: Tensor, a, b, c, d, tx, ty) -> Tensor:
    """[[a, b, tx], [c, d, ty], [0, 0, 1]] for each of n images, built without in-place writes so
    that gradients flow to every entry."""
    def col(v):
        return _per_image(v, n, like)
    zero = torch.zeros(n, dtype=like.dtype, device=like.device)
    one = torch.ones_like(zero)
    rows = [torch.stack([col(a), col(b), col(tx)], -1), torch.stack([col(c), col(d), col(ty)], -1),
            torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, -2)


def rotation(angle: Tensor, like: Tensor) -> Tensor:
    """Counter-clockwise as displayed (v points down), by ``angle`` radians; [N, 3, 3]."""
    angle = _per_image(angle, like.shape[0], like)
    c, s = torch.cos(angle), torch.sin(angle)
    return _matrix(like.shape[0], like, c, s, -s, c, 0.0, 0.0)


def translation(dx: Tensor, dy: Tensor, like: Tensor) -> Tensor:
    """Content moves ``dx`` pixels right and ``dy`` pixels down."""
    return _matrix(like.shape[0], like, 1.0, 0.0, 0.0, 1.0, dx, dy)


def scaling(factor: Tensor, like: Tensor) -> Tensor:
    """Content grows by ``factor`` about the image centre (< 1 shrinks)."""
    return _matrix(like.shape[0], like, factor, 0.0, 0.0, factor, 0.0, 0.0)


def shearing(k: Tensor, like: Tensor) -> Tensor:
    """Horizontal shear: a point at height v moves k·v pixels right."""
    return _matrix(like.shape[0], like, 1.0, k, 0.0, 1.0, 0.0, 0.0)


def warp(x: Tensor, forward: Tensor | None = None, displacement: Tensor | None = None) -> Tensor:
    """Resample x once: the output at p reads the input at A⁻¹p + displacement(p).

    ``forward``: [N, 3, 3] pixel-coordinate matrices (content at p moves to A p); ``displacement``:
    [N, 2, H, W] offsets in pixels (u, v) added to where each output pixel reads.
    """
    _check(x)
    n, _, h, w = x.shape
    if forward is None:
        forward = _eye(n, x)
    # pixel (u, v) → normalised coordinates of align_corners=False: (2u/W, 2v/H)
    to_norm = torch.diag(torch.tensor([2.0 / w, 2.0 / h, 1.0], dtype=x.dtype, device=x.device))
    from_norm = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], dtype=x.dtype, device=x.device))
    theta = (to_norm @ torch.linalg.inv(forward) @ from_norm)[:, :2]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [N, H, W, 2], (x, y) order
    if displacement is not None:
        scale = torch.tensor([2.0 / w, 2.0 / h], dtype=x.dtype, device=x.device)
        grid = grid + displacement.permute(0, 2, 3, 1) * scale
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(x: Tensor, angle) -> Tensor:
    return warp(x, rotation(angle, x))


def translate(x: Tensor, dx, dy) -> Tensor:
    return warp(x, translation(dx, dy, x))


def scale(x: Tensor, factor) -> Tensor:
    return warp(x, scaling(factor, x))


def shear(x: Tensor, k) -> Tensor:
    return warp(x, shearing(k, x))


def gaussian_kernel(sigma: float, dtype=torch.float32, device=None) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def smooth_field(field: Tensor, sigma: float) -> Tensor:
    """A random field [N, 2, H, W] smoothed by a Gaussian of width ``sigma`` pixels (separable, zero
    padding) and scaled to unit RMS per image, so that α below is the RMS displacement in pixels."""
    n, c, h, w = field.shape
    k = gaussian_kernel(sigma, field.dtype, field.device)
    r = k.numel() // 2
    flat = field.reshape(n * c, 1, h, w)
    flat = F.conv2d(F.pad(flat, (r, r, 0, 0)), k.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, r, r)), k.view(1, 1, -1, 1))
    out = flat.reshape(n, c, h, w)
    rms = out.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    return out / rms


def elastic(x: Tensor, field: Tensor, alpha, sigma: float) -> Tensor:
    """Simard et al.'s elastic distortion with a raw field [N, 2, H, W] (uniform in [−1, 1]) and
    RMS displacement ``alpha`` pixels (a scalar or one per image)."""
    alpha = _per_image(alpha, x.shape[0], x).view(-1, 1, 1, 1)
    return warp(x, None, alpha * smooth_field(field, sigma))


def gaussian_noise(x: Tensor, eps: Tensor, std) -> Tensor:
    _check(x)
    return x + _per_image(std, x.shape[0], x).view(-1, 1, 1, 1) * eps


def box_mask(shape, center: Tensor, size, softness: float, like: Tensor) -> Tensor:
    """[N, 1, H, W] mask of a square box: ``center`` [N, 2] in pixels (u from the left edge of the
    image, v from the top, pixel centres at 0.5, 1.5, ...), side ``size`` pixels. ``softness`` (pixels)
    widens its edges into a sigmoid; 0 gives the hard box."""
    n, _, h, w = shape
    size = _per_image(size, n, like).view(n, 1, 1)
    u = torch.arange(w, dtype=like.dtype, device=like.device) + 0.5
    v = torch.arange(h, dtype=like.dtype, device=like.device) + 0.5
    du = (u.view(1, 1, w) - center[:, 0].view(n, 1, 1)).abs()
    dv = (v.view(1, h, 1) - center[:, 1].view(n, 1, 1)).abs()
    if softness <= 0:
        inside = ((du < size / 2) & (dv < size / 2)).to(like.dtype)
        return inside.unsqueeze(1)
    return (torch.sigmoid((size / 2 - du) / softness) * torch.sigmoid((size / 2 - dv) / softness)).unsqueeze(1)


def erase(x: Tensor, center: Tensor, size, softness: float = 0.5, weight=1.0) -> Tensor:
    """Set a box to 0: x·(1 − w·M) with M = ``box_mask``; ``weight`` w (a scalar or one per image)
    blends between the image (0) and the erased image (1)."""
    _check(x)
    w = _per_image(weight, x.shape[0], x).view(-1, 1, 1, 1)
    return x * (1 - w * box_mask(x.shape, center, size, softness, x))
