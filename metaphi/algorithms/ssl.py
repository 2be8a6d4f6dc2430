"""Self-supervised pre-training as an initialization, and starting any learner from a trained body.

MAML learns an initialization from labelled tasks; self-supervised learning also finds one, from the
training images alone, with their labels thrown away. Two pretext tasks:

* **Rotation prediction** (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by
  Predicting Image Rotations"): every image is shown at 0°, 90°, 180° and 270°, and the network
  (body + a 4-way head) is trained by cross-entropy to say which rotation it sees.
* **Contrastive** (Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive
  Learning of Visual Representations", SimCLR): two random augmentations of each image in a batch
  of B; with z = g(f(x)) the projections (a two-layer MLP head g on the body f), normalised, the
  NT-Xent loss of view i with its partner j(i) among the other 2B − 1 views is

      ℓ_i = −log  exp(z_i·z_j(i) / τ) / Σ_{m ≠ i} exp(z_i·z_m / τ),    L = mean_i ℓ_i.

The augmentations suit handwriting: a random affine map (rotation, scale, shear, shift), thicker or
thinner strokes, and an erased patch. They are drawn in the sampler with the run's explicit
generator, so the loss itself is deterministic and runs under ``vmap``.

Used as a learner on a task, the pre-trained body is fine-tuned exactly as the supervised
"pretrain then fine-tune" baseline (baselines.Pretrain) is: its head is replaced by a zero N-way head
and every weight is trained on the support set by the inner update rule. Beside that baseline and
MAML this is the comparison the lecture asks for: what each way of finding an initialization is
worth for few-shot learning.

``start_from`` makes any learner start from a trained body instead of a random one: MAML started
from a self-supervised body is ``metaphi run maml --init ssl:CHECKPOINT``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.config import option
from metaphi.functional import Params, call, params_of, prefixed, with_prefix
from metaphi.inner import Unroll
from metaphi.tasks import DataError, Task
from metaphi.algorithms.base import CLASSIFICATION, Problem
from metaphi.algorithms.baselines import Pretrain
from metaphi.algorithms.protonet import _Method

OBJECTIVES = ("rotation", "simclr")


def rotations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each image [B, C, H, W] at 0°, 90°, 180°, 270° [4B, ...], with the rotation index as its label."""
    views = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    return views, torch.arange(4, device=x.device).repeat_interleave(x.shape[0])


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy; z1[i] and z2[i] are two views of one image."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    self_pair = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def augment(x: Tensor, generator: torch.Generator, rotate: float = 15.0, scale: tuple[float, float] = (0.8, 1.15),
            shear: float = 0.2, shift: float = 0.12, erase: float = 0.5) -> Tensor:
    """Random views of images x [B, C, H, W] (ink high, paper 0), all drawn from ``generator``.

    An affine map with rotation up to ±``rotate`` degrees, a zoom in ``scale``, a shear up to
    ±``shear``, a shift up to ±``shift`` of the image's half-width; then strokes made
    thicker (towards a max over the four neighbours), thinner (towards a min) or left alone, one
    chance in three each; then, with probability ``erase``, a square patch of 15-30 % of the side
    set to paper.
    """
    b, _, h, w = x.shape

    def uniform(low, high, *shape):
        return torch.rand(*shape, generator=generator) * (high - low) + low

    angle = uniform(-rotate, rotate, b) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shearing = torch.eye(2).repeat(b, 1, 1)
    shearing[:, 0, 1] = uniform(-shear, shear, b)
    # theta maps output coordinates to input ones, in units of the image's half-width
    linear = rotation @ shearing / uniform(*scale, b).view(b, 1, 1)
    theta = torch.cat([linear, uniform(-shift, shift, b, 2, 1)], -1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    views = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)

    # a thicker or thinner pen: part of the way to a max (or min) over the four neighbours
    shifted = torch.stack([F.pad(views, pad)[..., pad[3]:pad[3] + h, pad[0]:pad[0] + w]
                           for pad in ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1))])
    pen = torch.randint(3, (b,), generator=generator).view(b, 1, 1, 1)
    amount = uniform(0.3, 1.0, b).view(b, 1, 1, 1)
    thicker = torch.maximum(views, shifted.amax(0))
    thinner = torch.minimum(views, shifted.amin(0))
    views = torch.where(pen == 1, views + amount * (thicker - views),
                        torch.where(pen == 2, views + amount * (thinner - views), views))

    side = (uniform(0.15, 0.3, b) * h).long().clamp_min(1)
    top = (torch.rand(b, generator=generator) * (h - side + 1)).long()
    left = (torch.rand(b, generator=generator) * (w - side + 1)).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    patch = ((rows >= top.view(b, 1, 1)) & (rows < (top + side).view(b, 1, 1))
             & (cols >= left.view(b, 1, 1)) & (cols < (left + side).view(b, 1, 1)))
    patch &= (torch.rand(b, generator=generator) < erase).view(b, 1, 1)
    return views.masked_fill(patch.unsqueeze(1).to(views.device), 0.0)


_BATCH_HELP = "self-supervised pre-training: images per batch"


@dataclass
class RotationOptions:
    batch_size: int = option(64, _BATCH_HELP, check="positive")


@dataclass
class SimCLROptions:
    batch_size: int = option(64, _BATCH_HELP, check="positive")
    temperature: float = option(0.5, "SimCLR: τ of the NT-Xent loss", check="positive")


class SSL(Pretrain):
    """Self-supervised pre-training of the benchmark's network, then fine-tuning on each task.

    φ = {"init.*": the network (body and its pretext head)} ∪ {"proj.*": SimCLR's hidden projection
    layer}. A meta-batch is ``meta_batch`` batches of ``batch_size`` training images, labels dropped.
    The options are ``RotationOptions`` or, for SimCLR, ``SimCLROptions``.
    """

    name = "ssl"
    spec_class = "ssl"
    spec_args = ("objective", "inner_lr", "eval_steps")

    def __init__(self, model: nn.Module, objective: str, inner_lr: float, eval_steps: int = 20,
                 options: RotationOptions | None = None, name: str | None = None, problem: Problem = CLASSIFICATION):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
        kind = self.options_for({"objective": objective})
        options = options if options is not None else kind()
        if type(options) is not kind:
            raise TypeError(f"ssl-{objective} takes {kind.__name__}, not {type(options).__name__}")
        super().__init__(model, problem, inner_lr, eval_steps, options)
        self.objective = objective
        self.temperature = float(options.temperature) if objective == "simclr" else None
        self.name = name or f"ssl-{objective}"
        d = model.feature_dim
        self.projector = nn.Linear(d, d) if objective == "simclr" else None
        self._features = _Method(model, "features")

    def init_meta_params(self) -> Params:
        phi = with_prefix(params_of(self.model), "init")
        if self.projector is not None:
            phi.update(with_prefix(params_of(self.projector), "proj"))
        return phi

    def training_tasks(self, benchmark, ways, shots, query):
        if not benchmark.splits:
            raise DataError(f"self-supervised pre-training needs images; benchmark '{benchmark.name}' has none")
        pooled = benchmark.pooled("train", self.batch_size)

        def sample(n: int, generator: torch.Generator) -> Task:
            x = pooled.sample_batch(n, generator).query[0]  # [n, B, C, H, W]; the labels are not used
            if self.objective == "rotation":
                return Task((), (x,))
            flat = x.flatten(0, 1)
            first, second = augment(flat, generator), augment(flat, generator)
            return Task((first.view_as(x),), (second.view_as(x),))

        return sample

    @classmethod
    def options_for(cls, args: dict) -> type:
        return SimCLROptions if args["objective"] == "simclr" else RotationOptions

    def pretext_loss(self, phi: Params, task: Task) -> tuple[Tensor, dict[str, Tensor]]:
        init = prefixed(phi, "init")
        if self.objective == "rotation":
            views, labels = rotations(task.query[0])
            out = call(self.model, init, views)
            return F.cross_entropy(out, labels), {"accuracy": (out.argmax(-1) == labels).float().mean().detach()}
        first, second = task.support[0], task.query[0]
        features = call(self._features, with_prefix(init, "model"), torch.cat([first, second]))
        z = call(self.model.head, prefixed(init, "head"), torch.relu(call(self.projector, prefixed(phi, "proj"), features)))
        return nt_xent(z[: first.shape[0]], z[first.shape[0]:], self.temperature), {}

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()) -> tuple[Tensor, dict[str, Tensor]]:
        return self.pretext_loss(phi, task)


def defaults(settings: dict) -> dict:
    """Self-supervised pre-training learns without labels, so classes rotated into new classes add nothing
    but rotated copies, and to the rotation pretext task they are ambiguous (a class turned by 90° and
    turned back by 270° is the class itself): no rotations where the run does not ask for them."""
    return {"rotations": False}


def _ssl(benchmark, objective: str, inner_lr: float, eval_steps, options) -> SSL:
    if benchmark.problem.name != "classification":
        raise DataError(f"self-supervised pre-training here is for images; benchmark '{benchmark.name}' is "
                        f"{benchmark.problem.name}")
    # the pretext head: 4 rotations, or SimCLR's projection (as wide as the features)
    model = benchmark.model(4)
    if objective == "simclr":
        model = benchmark.model(model.feature_dim)
    return SSL(model, objective, inner_lr, 20 if eval_steps is None else eval_steps, options)


def ssl_rotation(benchmark, ways: int, inner_lr: float, inner_steps: int = 0, eval_steps=None,
                 options: RotationOptions | None = None) -> SSL:
    return _ssl(benchmark, "rotation", inner_lr, eval_steps, options)


def ssl_simclr(benchmark, ways: int, inner_lr: float, inner_steps: int = 0, eval_steps=None,
               options: SimCLROptions | None = None) -> SSL:
    return _ssl(benchmark, "simclr", inner_lr, eval_steps, options)


# --- starting a learner from a trained body --------------------------------------------------------

#: where a φ keeps its network's weights: an initialization (MAML, pretrain, SSL) or an embedding
BODY_PREFIXES = ("init", "embed")


def body_of(phi: Params) -> Params:
    """The backbone body's weights in φ by their name in the network ("body.0.weight"); φ's other
    entries (heads, learned step sizes such as Meta-SGD's "rule.body.*", relation modules) are left out."""
    body = {}
    for k, v in phi.items():
        prefix, _, name = k.partition(".")
        if prefix in BODY_PREFIXES and name.startswith("body."):
            body[name] = v
    return body


def load_body(spec: str) -> tuple[Params, str]:
    """The body saved in a checkpoint named by ``spec`` = ``[ssl:]PATH`` (``ssl:`` insists on an SSL run)."""
    import os

    from metaphi.checkpoint import CheckpointError
    from metaphi.train import load_checkpoint

    kind, _, path = spec.partition(":") if spec.startswith("ssl:") else ("", "", spec)
    if not os.path.isfile(path):
        raise DataError(f"--init: no checkpoint at {path}")
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:  # says what the file is
        raise DataError(f"--init: {e}") from None
    except Exception as e:  # a foreign file
        raise DataError(f"--init: {path} is not a readable metaphi checkpoint ({e})") from None
    if kind == "ssl" and ck["algorithm"].get("class") != "ssl":
        raise DataError(f"--init ssl:{path}: that run is '{ck['algorithm']['name']}', not a self-supervised one "
                        f"(give the path alone to start from any run's body)")
    body = body_of(ck["phi"])
    if not body:
        raise DataError(f"--init: {path} holds no backbone body")
    return body, ck["algorithm"]["name"]


class StartFrom:
    """``algorithm`` with the body entries of its φ taken from a trained network instead of drawn at
    random; everything else (heads, learned step sizes, relation modules) starts as the algorithm's own.

    Only where training starts changes, so the algorithm's ``spec`` is unchanged and a checkpoint of
    the result is rebuilt as the plain algorithm; every other attribute is the wrapped algorithm's.
    """

    def __init__(self, algorithm, body: Params, source: str = "checkpoint"):
        self.algorithm, self.body, self.source = algorithm, body, source
        phi = algorithm.init_meta_params()
        targets = {k: body_of({k: v}) for k, v in phi.items()}
        self._targets = {k: next(iter(t)) for k, t in targets.items() if t}
        if not self._targets:
            raise DataError(f"{algorithm.name} has no backbone body to start from {source}")
        for k, name in self._targets.items():
            if name not in body:
                raise DataError(f"{source} has no '{name}' for {algorithm.name}; it was trained with another network")
            if body[name].shape != phi[k].shape:
                raise DataError(f"{source}'s '{name}' has shape {tuple(body[name].shape)} but {algorithm.name} needs "
                                f"{tuple(phi[k].shape)}; it was trained with another network")

    def init_meta_params(self) -> Params:
        phi = self.algorithm.init_meta_params()
        for k, name in self._targets.items():
            phi[k] = self.body[name].detach().clone().to(phi[k].dtype).requires_grad_(phi[k].requires_grad)
        return phi

    def __getattr__(self, name: str) -> Any:
        return getattr(self.algorithm, name)


def start_from(algorithm, spec: str):
    """``algorithm`` starting from the body saved at ``spec`` = ``[ssl:]CHECKPOINT``."""
    body, source = load_body(spec)
    return StartFrom(algorithm, body, f"{spec} ({source})")
