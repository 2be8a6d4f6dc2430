"""An augmentation policy: for each image operation, a probability of applying it and a magnitude.

The policy acts on a batch image by image: operation k is applied to image i when its gate
g_ik = 1, with strength m_k ∈ [0, 1] times the operation's largest strength (``Space``) times a
per-image random factor (a signed uniform for the geometric operations, the field, the noise and
the box position for the others). A gate scales its operation's strength, so g = 0 is the identity
and g = 1 the operation itself; all operations are applied in the order of ``OPS`` with one
resampling for the geometric ones and the elastic field together (``ops.warp``).

Three ways to draw the gates from the probabilities p_k = σ(ℓ_k):

* **hard** (training a model): g_ik = 1[u_ik > 1 − p_k], u ~ U(0, 1) — a Bernoulli(p_k) draw.
* **relaxed** (the gradient search): the binary concrete / Gumbel-sigmoid relaxation (Maddison,
  Mnih & Teh 2017; Jang, Gu & Poole 2017), with the same uniform u and logistic noise
  L = log u − log(1 − u):

      g_ik = σ((ℓ_k + L_ik) / τ),

  which tends to the hard draw as the temperature τ → 0 and is differentiable in ℓ. With
  ``straight_through`` the forward pass uses the hard value 1[ℓ + L > 0] and the backward pass the
  relaxed gradient (Bengio et al. 2013). The magnitudes are σ of unconstrained numbers and enter
  every operation smoothly, so ∂(val loss)/∂m needs no relaxation. This is the relaxed sampling of
  DADA (Li et al. 2020, "DADA: Differentiable automatic data augmentation"), without its RELAX
  control variate.
* **discrete** (the REINFORCE search; AutoAugment, Cubuk et al. 2019): φ holds Bernoulli logits
  ``aug.apply`` [K] and categorical logits ``aug.level`` [K, B] over B magnitude levels
  (1/B, 2/B, ..., 1). A sampled choice turns each operation on or off for the whole batch at one
  level; ``metaphi.outer.reinforce`` estimates the gradient of the expected validation loss.

φ is a flat dict: ``aug.logit``, ``aug.magnitude`` (relaxed) or ``aug.apply``, ``aug.level``
(discrete). ``Policy`` is the frozen result used to train a model: probabilities and magnitudes.
Randomness comes only from explicit generators (``draw_noise``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from metaphi.augment import ops

OPS = ("rotate", "translate", "scale", "shear", "elastic", "noise", "erase")
#: magnitude levels of the discrete (REINFORCE) parametrization
LEVELS = 5


@dataclass(frozen=True)
class Space:
    """The strength of each operation at magnitude 1 (sizes as fractions of the image side)."""

    rotate: float = 30.0          # degrees, either way
    translate: float = 0.25       # of the side, along each axis, either way
    scale: float = 0.3            # factor in [1 − 0.3, 1 + 0.3]
    shear: float = 0.4            # horizontal shear factor, either way
    elastic: float = 0.1          # RMS displacement, of the side
    elastic_sigma: float = 0.15   # smoothing width of the field, of the side
    noise: float = 0.5            # standard deviation (images in [0, 1])
    erase: float = 0.5            # side of the erased box, of the image side
    erase_softness: float = 0.5   # pixels of soft edge of the box

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Policy:
    """Probabilities and magnitudes (each [K], in [0, 1], in the order of ``OPS``)."""

    prob: Tensor
    magnitude: Tensor

    def to_dict(self) -> dict:
        return {op: {"prob": round(float(p), 4), "magnitude": round(float(m), 4)}
                for op, p, m in zip(OPS, self.prob, self.magnitude)}

    @staticmethod
    def from_dict(d: dict) -> "Policy":
        missing = [op for op in OPS if op not in d]
        if missing:
            raise ValueError(f"a policy needs every operation of {', '.join(OPS)}; missing {', '.join(missing)}")
        return Policy(torch.tensor([float(d[op]["prob"]) for op in OPS]),
                      torch.tensor([float(d[op]["magnitude"]) for op in OPS]))


def no_policy() -> Policy:
    return Policy(torch.zeros(len(OPS)), torch.zeros(len(OPS)))


def random_policy(generator: torch.Generator) -> Policy:
    """Every probability and magnitude uniform in [0, 1]: the random-search baseline's one draw."""
    return Policy(torch.rand(len(OPS), generator=generator), torch.rand(len(OPS), generator=generator))


def _logit(p: float) -> float:
    if not 0 < p < 1:
        raise ValueError(f"an initial probability or magnitude must be strictly between 0 and 1, got {p}")
    return math.log(p / (1 - p))


def init_relaxed(prob: float = 0.2, magnitude: float = 0.3, dtype=torch.float32) -> dict[str, Tensor]:
    k = len(OPS)
    return {"aug.logit": torch.full((k,), _logit(prob), dtype=dtype, requires_grad=True),
            "aug.magnitude": torch.full((k,), _logit(magnitude), dtype=dtype, requires_grad=True)}


def init_discrete(prob: float = 0.2, magnitude: float = 0.3, dtype=torch.float32) -> dict[str, Tensor]:
    """Bernoulli logits at ``prob``; level logits −λ·level with λ chosen so that the expected
    magnitude is ``magnitude`` (λ = 0, uniform levels, gives 0.6): the same starting policy as
    ``init_relaxed(prob, magnitude)``."""
    k = len(OPS)
    levels = level_values(torch.float64)
    if not levels[0] < magnitude < levels[-1]:
        raise ValueError(f"the discrete policy's levels are {', '.join(f'{v:g}' for v in levels.tolist())}; its initial "
                         f"expected magnitude must lie strictly between {levels[0]:g} and 1, got {magnitude}")
    low, high = -200.0, 200.0  # the expected level falls as λ grows: bisect
    for _ in range(200):
        lam = (low + high) / 2
        if float(torch.softmax(-lam * levels, 0) @ levels) > magnitude:
            low = lam
        else:
            high = lam
    return {"aug.apply": torch.full((k,), _logit(prob), dtype=dtype, requires_grad=True),
            "aug.level": (-lam * levels).to(dtype).expand(k, LEVELS).clone().requires_grad_()}


def level_values(dtype=torch.float32, device=None) -> Tensor:
    return torch.arange(1, LEVELS + 1, dtype=dtype, device=device) / LEVELS


def policy_of(phi: dict[str, Tensor]) -> Policy:
    """The policy φ stands for: σ of the relaxed logits and magnitudes, or for the discrete form the
    apply probabilities and the expected magnitude level."""
    with torch.no_grad():
        if "aug.logit" in phi:
            return Policy(torch.sigmoid(phi["aug.logit"]).float().cpu(),
                          torch.sigmoid(phi["aug.magnitude"]).float().cpu())
        if "aug.apply" in phi:
            levels = torch.softmax(phi["aug.level"].double(), -1) @ level_values(torch.float64)
            return Policy(torch.sigmoid(phi["aug.apply"]).float().cpu(), levels.float().cpu())
    raise ValueError(f"φ has no augmentation policy (keys {sorted(phi)}); expected aug.logit/aug.magnitude or "
                     "aug.apply/aug.level")


def draw_noise(n: int, image_shape, generator: torch.Generator, dtype=torch.float32) -> dict[str, Tensor]:
    """All the randomness of augmenting n images: gate uniforms, signed factors, elastic field,
    pixel noise and box centres. Fixing it makes the relaxed augmentation a deterministic function
    of φ (finite differences, common random numbers across compared policies)."""
    c, h, w = image_shape
    u = torch.rand(n, len(OPS), generator=generator, dtype=torch.float64)
    return {
        "gate": (u * (1 - 2e-6) + 1e-6).to(dtype),        # kept off 0 and 1, where the logistic is infinite
        "sign": (2 * torch.rand(n, 5, generator=generator, dtype=torch.float64) - 1).to(dtype),
        "field": (2 * torch.rand(n, 2, h, w, generator=generator, dtype=torch.float64) - 1).to(dtype),
        "eps": torch.randn(n, c, h, w, generator=generator, dtype=torch.float64).to(dtype),
        "center": (torch.rand(n, 2, generator=generator, dtype=torch.float64)
                   * torch.tensor([w, h], dtype=torch.float64)).to(dtype),
    }


def logistic(u: Tensor) -> Tensor:
    return torch.log(u) - torch.log1p(-u)


def relaxed_gates(logit: Tensor, u: Tensor, temperature: float, straight_through: bool = False) -> Tensor:
    """σ((ℓ + L)/τ) for uniforms u [N, K]; straight-through: the hard value forward, this gradient back."""
    if temperature <= 0:
        raise ValueError(f"the relaxation temperature must be positive, got {temperature}")
    z = logit + logistic(u)
    soft = torch.sigmoid(z / temperature)
    if not straight_through:
        return soft
    return (z > 0).to(soft.dtype) + soft - soft.detach()


def hard_gates(prob: Tensor, u: Tensor) -> Tensor:
    """Bernoulli(p) from uniforms: 1[u > 1 − p], the τ → 0 limit of ``relaxed_gates`` with the same u."""
    return (u > 1 - prob.to(u.dtype)).to(u.dtype)


def apply(x: Tensor, gates: Tensor, magnitude: Tensor, noise: dict[str, Tensor], space: Space = Space()) -> Tensor:
    """Augment images x [N, C, H, W] with gates [N, K] (or [K], one for all) and magnitudes [K] in [0, 1]."""
    n, _, h, w = x.shape
    if gates.dim() == 1:
        gates = gates.expand(n, -1)
    if gates.shape != (n, len(OPS)) or magnitude.shape[-1] != len(OPS):
        raise ValueError(f"gates must be [N, {len(OPS)}] and magnitudes [{len(OPS)}]; got {tuple(gates.shape)} "
                         f"and {tuple(magnitude.shape)}")
    s = gates * magnitude                                     # [N, K]: each op's strength for each image
    sign = noise["sign"]
    side = float(min(h, w))
    angle = s[:, 0] * math.radians(space.rotate) * sign[:, 0]
    shift_u, shift_v = s[:, 1] * space.translate * w * sign[:, 1], s[:, 1] * space.translate * h * sign[:, 2]
    factor = 1 + s[:, 2] * space.scale * sign[:, 3]
    k = s[:, 3] * space.shear * sign[:, 4]
    forward = (ops.translation(shift_u, shift_v, x) @ ops.rotation(angle, x) @ ops.shearing(k, x)
               @ ops.scaling(factor, x))
    alpha = (s[:, 4] * space.elastic * side).view(-1, 1, 1, 1)
    displacement = alpha * ops.smooth_field(noise["field"], space.elastic_sigma * side)
    out = ops.warp(x, forward, displacement)
    out = ops.gaussian_noise(out, noise["eps"], s[:, 5] * space.noise)
    return ops.erase(out, noise["center"], magnitude[6] * space.erase * side, space.erase_softness, gates[:, 6])


def augment(x: Tensor, policy: Policy, generator: torch.Generator, space: Space = Space()) -> Tensor:
    """Train-time augmentation: each operation on each image with its probability (hard gates)."""
    noise = draw_noise(x.shape[0], x.shape[1:], generator, x.dtype)
    noise = {k: v.to(x.device) for k, v in noise.items()}
    prob, magnitude = policy.prob.to(x.device, x.dtype), policy.magnitude.to(x.device, x.dtype)
    if not bool((prob > 0).any()):
        return x
    return apply(x, hard_gates(prob, noise["gate"]), magnitude, noise, space)
