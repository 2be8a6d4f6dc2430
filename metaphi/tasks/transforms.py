"""Random transforms of training images, every draw from an explicit ``torch.Generator``.

:class:`RandomAffine` moves each image by its own small random affine map: a shift of up to ±10% of
the image's size along each axis, a zoom in [0.9, 1.1], a rotation of up to ±15° and a shear of up to
±10°, all uniform, scaled together by ``strength`` in [0, 1] (0 leaves the images as they are). These
are the usual small-affine ranges for handwritten characters: a character shifted, a little bigger or
smaller, turned or slanted is still the same character (Koch, Zemel & Salakhutdinov 2015 trained
Siamese networks on Omniglot with random affine distortions of these four kinds; the ranges here are
the common small ones, to be chosen on validation classes, not taken from one paper).

With ``elastic`` > 0 each image is also bent by its own smooth random displacement field (Simard,
Steinkraus & Platt 2003's elastic distortion of handwritten digits; here the field is drawn on a
coarse grid of control points and interpolated, which makes it smooth without a Gaussian filter):
strokes wobble as another hand would draw them, which an affine map cannot do.

The maps are applied with one bilinear resampling of the whole batch (``F.affine_grid`` /
``F.grid_sample``, as in :mod:`metaphi.augment.ops`), so an episode of any number of images costs one
call. Parameters are drawn from the generator passed in, the sampler's own: a training run that
augments is reproducible from its seed and resumes bitwise from a checkpoint of that generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: what fills the parts of an image moved in from outside it: paper of ink-high characters (0), or
#: the image's own edge (natural images, light backgrounds)
PADDINGS = ("zeros", "border")
#: the largest augmentation strength: every range doubled (shift ±20%, zoom 0.8-1.2, ±30°, shear ±20°)
MAX_STRENGTH = 2.0
#: the largest elastic displacement of a control point, as a fraction of the image's size
MAX_ELASTIC = 0.2


@dataclass(frozen=True)
class RandomAffine:
    """A random affine map per image: ``transform(x, generator)`` for float images ``x [..., C, H, W]``.

    Per image, uniformly and independently: a shift of up to ±``shift`` of the width (and of the
    height), a zoom in [1 - ``scale``, 1 + ``scale``], a rotation of up to ±``rotate`` degrees and a
    horizontal shear of up to ±``shear`` degrees, about the image's centre; every range is multiplied
    by ``strength`` (0: the identity, no draws). ``padding`` fills what moves in from outside the image
    (``zeros``: dark paper of ink-high characters; ``border``: the nearest edge pixel). Shapes, dtype
    and the value range [0, 1] are kept.
    """

    strength: float = 1.0
    shift: float = 0.10
    scale: float = 0.10
    rotate: float = 15.0
    shear: float = 10.0
    padding: str = "zeros"
    #: largest displacement of an elastic control point, as a fraction of the image's size (0: none)
    elastic: float = 0.0
    #: control points of the elastic field along each side
    elastic_points: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= MAX_STRENGTH:
            raise ValueError(f"augmentation strength must be in [0, {MAX_STRENGTH:g}], got {self.strength}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got '{self.padding}'")
        if not 0.0 <= self.elastic <= MAX_ELASTIC:
            raise ValueError(f"elastic displacement must be in [0, {MAX_ELASTIC:g}] of the image's size, "
                             f"got {self.elastic}")

    def matrices(self, n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
        """``theta [n, 2, 3]`` for ``F.affine_grid``: each maps an output pixel's normalised
        coordinates to where it is read from in the input (the inverse of the drawn map)."""
        u = torch.rand(n, 5, generator=generator, dtype=torch.float64).mul_(2).sub_(1)  # uniform in [-1, 1)
        s = self.strength
        angle = math.radians(self.rotate * s) * u[:, 0]
        slant = torch.tan(math.radians(self.shear * s) * u[:, 1])
        zoom = 1.0 + self.scale * s * u[:, 2]
        shift = 2.0 * self.shift * s * u[:, 3:5]  # normalised coordinates span 2 per image side
        cos, sin = torch.cos(angle), torch.sin(angle)
        # the drawn map, in pixel units about the centre, is A = zoom * R(angle) @ [[1, slant], [0, 1]];
        # its inverse is [[1, -slant], [0, 1]] @ R(-angle) / zoom
        inverse = torch.stack([torch.stack([cos + slant * sin, sin - slant * cos], -1),
                               torch.stack([-sin, cos], -1)], -2) / zoom.view(n, 1, 1)
        # pixel units -> normalised ones (x by width / 2, y by height / 2): D^-1 A^-1 D
        half = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64)
        linear = inverse * half.view(1, 1, 2) / half.view(1, 2, 1)
        # read position = A^-1 (output - shift)
        offset = -(linear @ shift.unsqueeze(-1))
        return torch.cat([linear, offset], -1)

    def displacements(self, n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
        """``[n, height, width, 2]``: a smooth random field added to the sampling grid (normalised
        coordinates): each of ``elastic_points`` x ``elastic_points`` control points moved uniformly by up
        to ±``elastic`` x ``strength`` of the image's size along each axis, bicubically interpolated."""
        k = self.elastic_points
        u = torch.rand(n, 2, k, k, generator=generator, dtype=torch.float64).mul_(2).sub_(1)
        field = F.interpolate(u, size=(height, width), mode="bicubic", align_corners=True)
        return (2.0 * self.elastic * self.strength * field).permute(0, 2, 3, 1)  # a side spans 2

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.strength == 0.0 or x.numel() == 0:
            return x
        c, h, w = x.shape[-3:]
        flat = x.reshape(-1, c, h, w)
        theta = self.matrices(flat.shape[0], h, w, generator).to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
        if self.elastic > 0.0:
            grid = grid + self.displacements(flat.shape[0], h, w, generator).to(device=x.device, dtype=x.dtype)
        out = F.grid_sample(flat, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)
        return out.view(x.shape)


def transform_images(transform, generator: torch.Generator, *images: Tensor) -> tuple[Tensor, ...]:
    """``images`` (each ``[..., C, H, W]``, e.g. an episode's support and query) passed through
    ``transform`` in one call, each image with its own draw; shapes kept."""
    shape = images[0].shape[-3:]
    flat = [x.reshape(-1, *shape) for x in images]
    out = transform(torch.cat(flat), generator)
    return tuple(part.view(x.shape) for part, x in zip(out.split([len(f) for f in flat]), images))
