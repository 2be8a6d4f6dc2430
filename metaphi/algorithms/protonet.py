"""Prototypical Networks (Snell, Swersky & Zemel 2017, "Prototypical Networks for Few-shot Learning"),
and what every metric learner here shares.

A metric learner has no inner gradient loop: φ is an embedding network f_φ (the benchmark's
backbone body), and a task is learned by embedding its support set and comparing each query with it.
A Prototypical Network summarises class k by the mean of its embedded support examples,

    c_k = 1/|S_k| Σ_{(x_i, y_i) ∈ S, y_i = k} f_φ(x_i)

and classifies a query by a softmax over negative distances to the prototypes,

    p_φ(y = k | x) = exp(−d(f_φ(x), c_k)) / Σ_k' exp(−d(f_φ(x), c_k'))

with d the squared Euclidean distance (the paper's choice, a Bregman divergence, which makes the
classifier linear in f_φ(x)), or, as an alternative, d = −s·cos(f_φ(x), c_k) with a learned scale s
(cosine logits are bounded, so without a scale the softmax could never become confident).
L(φ) is the query cross-entropy, minimised over training episodes; the paper trains with more
classes per episode than it tests with (60-way on Omniglot), which ``metaphi run --train-ways`` does.

Support and query are embedded as one batch, as in the paper's code, so the task batch norm of the
backbone sees the whole episode; ``predict`` on a single image therefore still has sound statistics.

The number of classes of a task is not known from tensor shapes (it is data: the labels), and the
same code must run under ``torch.func.vmap``. So the class axis has one slot for every support
example (there are at most that many classes); slots that no support example fills are masked out
of every softmax. The result equals the unpadded computation, for any number of ways.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.config import UsageError, option
from metaphi.functional import Params, call, params_of, prefixed, with_prefix
from metaphi.inner import Unroll
from metaphi.tasks import DataError, Task
from metaphi.algorithms.base import CLASSIFICATION, Algorithm, Problem, learnable_names, take_user_model


class _Method(nn.Module):
    """Runs one method of a module (``features``) under ``functional_call``, which only calls forward."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args):
        return getattr(self.model, self.method)(*args)


def class_slots(labels: Tensor, slots: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """One-hot ``labels`` over ``slots`` classes [n, slots], and which slots hold any example [slots]."""
    onehot = (labels.unsqueeze(-1) == torch.arange(slots, device=labels.device)).to(dtype)
    return onehot, onehot.sum(0) > 0


def masked(scores: Tensor, present: Tensor) -> Tensor:
    """Scores [..., slots] with the empty class slots at −inf, so softmax and argmax ignore them."""
    return torch.where(present, scores, torch.full_like(scores, float("-inf")))


def prototypes(support_z: Tensor, support_y: Tensor) -> tuple[Tensor, Tensor]:
    """Class means of the support embeddings [slots, d] (slot k = class k), and which slots are filled."""
    onehot, present = class_slots(support_y, support_y.shape[0], support_z.dtype)
    counts = onehot.sum(0).clamp_min(1.0)
    return onehot.T @ support_z / counts.unsqueeze(-1), present


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """||a_i − b_j||² [n, m], from differences rather than the expanded form, which loses precision."""
    return (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)


def cosine_similarities(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(eps)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(eps)
    return a @ b.transpose(-1, -2)


class MetricLearner(Algorithm):
    """What the metric learners share: φ = the embedding ("embed.*", the backbone without its head and
    without frozen parameters, which are kept as they are) plus the learner's own pieces; task scores [queries, class slots] come from ``scores``.

    Subclasses define ``_extra_params()`` (their own modules' parameters, prefixed), ``scores(phi,
    support, xq)`` returning (scores, present) and, if not cross-entropy on the scores,
    ``_query_loss``. Scores are logits: higher means more likely.
    """

    # There is no inner loop, so first- and second-order meta-gradients are the same exact gradient.
    estimators = ("first-order", "second-order")
    checks_model = True
    # A task is already one batch (support and query embedded together): tasks one at a time are 2-3x
    # faster on a CPU than a vmapped chunk of them (Conv4, 5- and 20-way; torch 2.13).
    batched_eval = False
    #: trains and tests on tasks with any number of classes (``--train-ways`` may differ from ``--ways``)
    any_ways = True

    def __init__(self, model: nn.Module, name: str, problem: Problem = CLASSIFICATION, options: Any = None):
        if problem.name != "classification":
            raise ValueError(f"metric learners classify; {name} does not apply to {problem.name}")
        self.model, self.name = model, name
        self.problem = CLASSIFICATION
        self.options = options if options is not None else self.Options()
        take_user_model(model)
        # a backbone with features() embeds by it and leaves its head out; any other module is the encoder
        self._whole = not callable(getattr(model, "features", None))
        self._features = model if self._whole else _Method(model, "features")
        self._embed_keys = [k for k in learnable_names(model) if self._whole or not k.startswith("head.")]

    def _extra_params(self) -> Params:
        return {}

    def init_meta_params(self) -> Params:
        weights = params_of(self.model)
        phi = {**with_prefix({k: weights[k] for k in self._embed_keys}, "embed"), **self._extra_params()}
        return {k: v.detach().clone().requires_grad_() for k, v in phi.items()}

    def embed(self, phi: Params, x: Tensor) -> Tensor:
        """f_φ(x): the backbone's features (body, then its pooling), or a plain encoder's output flattened."""
        weights = prefixed(phi, "embed")
        if self._whole:
            return call(self.model, weights, x).flatten(1)
        return call(self._features, with_prefix(weights, "model"), x)

    def embed_episode(self, phi: Params, xs: Tensor, xq: Tensor) -> tuple[Tensor, Tensor]:
        z = self.embed(phi, torch.cat([xs, xq]))
        return z[: xs.shape[0]], z[xs.shape[0]:]

    def scores(self, phi: Params, support: Any, xq: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _query_loss(self, scores: Tensor, present: Tensor, yq: Tensor) -> Tensor:
        return F.cross_entropy(masked(scores, present), yq)

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()) -> tuple[Tensor, dict[str, Tensor]]:
        xq, yq = task.query
        scores, present = self.scores(phi, task.support, xq)
        accuracy = (masked(scores, present).argmax(-1) == yq).float().mean()
        return self._query_loss(scores, present, yq), {"accuracy": accuracy.detach()}

    def evaluate(self, phi: Params, task: Task, steps: int | None = None) -> Tensor:
        """Query accuracy as a 1-element tensor: there are no inner steps, whatever ``steps`` says."""
        xq, yq = task.query
        with torch.no_grad():
            scores, present = self.scores({k: v.detach() for k, v in phi.items()}, task.support, xq)
            return (masked(scores, present).argmax(-1) == yq).float().mean().unsqueeze(0)

    def predict(self, phi: Params, support: Any, x: Tensor, steps: int | None = None) -> Tensor:
        """Logits [len(x), ways] for ``x`` given the support set; ``steps`` is ignored (no inner loop)."""
        ways = int(support[1].max()) + 1
        with torch.no_grad():
            scores, _ = self.scores({k: v.detach() for k, v in phi.items()}, support, x)
        return scores[:, :ways]


#: the initial scale s of cosine logits where none is given
COSINE_SCALE = 10.0


@dataclass
class ProtoNetOptions:
    distance: str = option("euclidean", "ProtoNet: squared euclidean distance (the paper) or cosine with a learned "
                           "scale", choices=("euclidean", "cosine"))
    cosine_scale: float | None = option(None, f"ProtoNet with cosine distance: the learned scale's initial value "
                                        f"(none: {COSINE_SCALE:g})", check="positive")


@dataclass
class ProtoNetCosineOptions(ProtoNetOptions):
    distance: str = option("cosine", "ProtoNet: squared euclidean distance (the paper) or cosine with a learned "
                           "scale", choices=("euclidean", "cosine"))


class ProtoNet(MetricLearner):
    spec_class = "protonet"
    Options = ProtoNetOptions

    def __init__(self, model: nn.Module, problem: Problem = CLASSIFICATION, options: ProtoNetOptions | None = None,
                 name: str = "protonet"):
        options = options if options is not None else ProtoNetOptions()
        if options.distance not in ("euclidean", "cosine"):
            raise ValueError("distance must be 'euclidean' or 'cosine'")
        if options.distance != "cosine" and options.cosine_scale is not None:
            raise UsageError("--cosine-scale applies to ProtoNet with --distance cosine (protonet-cosine)")
        super().__init__(model, name, problem, options)
        self.distance = options.distance
        self.initial_scale = COSINE_SCALE if options.cosine_scale is None else float(options.cosine_scale)

    def _extra_params(self) -> Params:
        return {"scale": torch.tensor(self.initial_scale)} if self.distance == "cosine" else {}

    def scores(self, phi: Params, support: Any, xq: Tensor) -> tuple[Tensor, Tensor]:
        xs, ys = support
        zs, zq = self.embed_episode(phi, xs, xq)
        protos, present = prototypes(zs, ys)
        if self.distance == "euclidean":
            return -squared_distances(zq, protos), present
        return phi["scale"] * cosine_similarities(zq, protos), present


#: ProtoNet's recipe on character data (Snell et al. 2017's Omniglot protocol): 60-way training episodes
#: with 5 queries per class, one episode per step, max-pooling Conv4
CHARACTER_RECIPE = {"train_ways": 60, "query": 5, "meta_batch": 1, "pool": "max"}
#: and on other images (their miniImageNet 1-shot protocol): 30-way episodes with 15 queries per class
IMAGE_RECIPE = {"train_ways": 30, "query": 15, "meta_batch": 1, "pool": "max"}
#: the smallest images Conv4's four 2x2 max poolings take
MAX_POOL_SIZE = 16
#: what was chosen on validation characters for folders of characters (benchmarks/omniglot_recipe_choice.py:
#: random affine augmentation lowered the validation error from 7.4% to 6.1%, a cosine step size did not
#: change it, so it stays constant) and a run length of about 30 CPU-minutes on this 2-core machine
#: (the image size, 32 x 32 for characters, is the folder's own default: metaphi.tasks.folder.CHARACTER_SIZE,
#: chosen on a held-out alphabet by benchmarks/omniglot_alphabet_choice.py)
FOLDER_CHARACTER_RECIPE = {"augment": True, "iterations": 2000}


def defaults(settings: dict) -> dict:
    """ProtoNet's recipe on an image benchmark (``settings["images"]``; nothing otherwise): the paper's
    episodes (more ways than the tests, several queries per class, one episode per step) and
    max-pooling Conv4; on a folder of characters also the schedule, augmentation and run length chosen
    on validation classes. ``train_ways`` is capped by the training classes (``settings["train_classes"]``),
    ``query`` by the images of the smallest training class beside the shots; max pooling needs
    images of ``MAX_POOL_SIZE`` pixels or more."""
    if not settings.get("images"):
        return {}
    recipe = dict(CHARACTER_RECIPE if settings.get("characters") else IMAGE_RECIPE)
    if settings.get("train_classes"):
        recipe["train_ways"] = min(recipe["train_ways"], settings["train_classes"])
    if settings.get("image_size", 0) < MAX_POOL_SIZE:  # four 2x2 poolings need 16 pixels
        del recipe["pool"]
    if settings.get("train_class_images"):  # as many queries as the smallest class has images beside the shots
        room = settings["train_class_images"] - (settings.get("shots") or 1)
        recipe["query"] = max(1, min(recipe["query"], room))
    if settings.get("folder") and settings.get("characters"):
        recipe.update(FOLDER_CHARACTER_RECIPE)
    return recipe


def _backbone(benchmark, ways: int) -> nn.Module:
    if benchmark.problem.name != "classification":
        raise DataError(f"metric learners classify, and benchmark '{benchmark.name}' is {benchmark.problem.name}; "
                        "choose a classification benchmark")
    return benchmark.model(ways)


def protonet(benchmark, ways: int, inner_lr: float = 0.0, inner_steps: int = 0, eval_steps=None,
             options: ProtoNetOptions | None = None) -> ProtoNet:
    return ProtoNet(_backbone(benchmark, ways), options=options, name="protonet")


def protonet_cosine(benchmark, ways: int, inner_lr: float = 0.0, inner_steps: int = 0, eval_steps=None,
                    options: ProtoNetOptions | None = None) -> ProtoNet:
    return ProtoNet(_backbone(benchmark, ways), options=options or ProtoNetCosineOptions(), name="protonet-cosine")
