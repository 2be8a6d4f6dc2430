"""Learning an optimizer: meta-training update rules on families of optimizees.

Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient descent". An optimizee
f (a random quadratic, a small net on a random classification task) is trained for T steps by an
update rule g with meta-parameters φ:

    θ_{t+1} = θ_t + g_φ(∇f(θ_t), h_t),      L(φ) = E_f [ (1/T) Σ_{t=1}^{T} f(θ_t) ]

and φ follows ∇_φ L, backpropagated through the optimizee's training. Truncated backpropagation
through time: the horizon T is cut into pieces of ``unroll`` steps; after each piece φ takes one step
of Adam on that piece's loss, and θ and the rule's state go on, detached, into the next piece, so
memory and the length of the backward pass are bounded by ``unroll``, not T. As in the paper, the
optimizee's gradients are inputs, not functions of φ (∂∇f(θ_t)/∂φ := 0), which avoids second
derivatives of f; ``second_order=True`` keeps them and gives the exact gradient of the truncated loss.

The loss at θ_t is measured on the same minibatch that gives ∇f(θ_t), so each step costs one
forward and backward pass of the optimizee.

``estimator="es"`` replaces backpropagation through the truncation by antithetic evolution strategies
(``metaphi.outer.es``): each member of a population φ ± σε runs the same truncation, and the
meta-gradient is estimated from their losses alone, so the rule need not be differentiable.

Optimizee families (each a batch of ``n`` independent problems in one set of tensors with a leading
problem dimension, so coordinatewise rules and ``torch.optim`` treat them exactly as n separate runs):

* ``Quadratics``  f(θ) = ||Wθ − y||², W [10, 10], y [10], θ₀ ~ N(0, 1), as in the paper.
* ``GlyphMLP``    a fully connected net (one hidden layer of 20 sigmoid units, as the paper's MNIST
                  net) classifying the images of ``classes`` random glyph characters, trained on
                  minibatches of 128. The paper's generalization tests are variants of it: wider
                  (40 units), two hidden layers, ReLU, and twice the horizon.

``evaluate_optimizer`` runs any ``torch.optim`` optimizer (a learned one through ``LearnedOptimizer``)
on fixed problems and records the full-data loss after every step; ``tune_learning_rate`` picks the
best rate of a hand-designed optimizer on a grid, on problems apart from the test ones.

The study (``metaphi l2o train | eval``): ``run_train(L2OTrainConfig)`` meta-trains a rule, keeps the
meta-parameters best on validation problems and scores them on test problems; ``run_eval(L2OEvalConfig)``
compares learned optimizers with tuned hand-designed ones (``compare``). Every file is plain data read
back without unpickling code (``metaphi.checkpoint``); ``config.yaml`` in the output folder reruns a
training run.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from metaphi.config import UsageError, option, to_dict
from metaphi.functional import Params, detach
from metaphi.inner.learned import RULE_NAMES


# ------------------------------------------------------------------------------------------ optimizees
class Quadratics:
    """f(θ) = ||Wθ − y||² with W, y and θ₀ standard normal (Andrychowicz et al. 2016, §3.1)."""

    def __init__(self, dim: int = 10, split: str = "train"):
        self.dim, self.split = int(dim), split

    def spec(self) -> dict:
        return {"name": "quadratic", "dim": self.dim, "split": self.split}

    def sample(self, n: int, generator: torch.Generator) -> tuple[Params, dict]:
        d = self.dim
        w = torch.randn(n, d, d, generator=generator)
        y = torch.randn(n, d, generator=generator)
        theta = torch.randn(n, d, generator=generator)
        return {"theta": theta}, {"W": w, "y": y}

    def batch(self, data: dict, generator: torch.Generator) -> None:
        return None

    def loss(self, params: Params, data: dict, batch: None = None) -> Tensor:
        residual = (data["W"] @ params["theta"].unsqueeze(-1)).squeeze(-1) - data["y"]
        return residual.square().sum(-1)

    def full_loss(self, params: Params, data: dict) -> Tensor:
        return self.loss(params, data)


class GlyphMLP:
    """A small MLP trained on the images of ``classes`` random glyph characters (one problem each).

    Characters come from the alphabets of ``split`` ("train", "val" or "test" of ``glyph_splits``),
    so a learned optimizer is tested on characters of styles it never trained on. Images are scaled
    to ``image_size`` (area averaging) and to [0, 1]. Weights start as ``nn.Linear``'s, U(±1/√fan_in).
    """

    def __init__(self, hidden: Iterable[int] = (20,), activation: str = "sigmoid", classes: int = 100,
                 batch_size: int = 128, image_size: int = 14, split: str = "train", glyphs: dict | None = None):
        if activation not in ("sigmoid", "relu", "tanh"):
            raise ValueError(f"activation must be sigmoid, relu or tanh, got '{activation}'")
        self.hidden, self.activation = [int(h) for h in hidden], activation
        self.classes, self.batch_size, self.image_size = int(classes), int(batch_size), int(image_size)
        self.split, self.glyphs = split, dict(glyphs or {})
        self._data = None

    def spec(self) -> dict:
        return {"name": "glyph-mlp", "hidden": self.hidden, "activation": self.activation, "classes": self.classes,
                "batch_size": self.batch_size, "image_size": self.image_size, "split": self.split,
                "glyphs": self.glyphs}

    def _images(self) -> tuple[Tensor, list[Tensor]]:
        if self._data is None:
            from metaphi.tasks import DataError
            from metaphi.tasks.glyphs import glyph_splits, load_glyphs

            dtype = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32)  # the generator is written for float32
            try:
                split = glyph_splits(load_glyphs(**self.glyphs))[self.split]
            finally:
                torch.set_default_dtype(dtype)
            if split.num_classes < self.classes:
                raise DataError(f"the glyphs {self.split} split has {split.num_classes} classes, fewer than "
                                f"classes={self.classes}")
            x = split.images.float().div_(255.0)
            if x.shape[-1] != self.image_size:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
            by_class = [split.indices_of(c) for c in range(split.num_classes)]
            self._data = (x.flatten(1), by_class)
        return self._data

    @property
    def sizes(self) -> list[int]:
        return [self.image_size ** 2, *self.hidden, self.classes]

    def sample(self, n: int, generator: torch.Generator) -> tuple[Params, dict]:
        x, by_class = self._images()
        per_class = min(len(i) for i in by_class)
        xs, ys = [], []
        for _ in range(n):
            chosen = torch.randperm(len(by_class), generator=generator)[: self.classes]
            idx = torch.cat([by_class[c][torch.randperm(len(by_class[c]), generator=generator)[:per_class]]
                             for c in chosen.tolist()])
            xs.append(x[idx])
            ys.append(torch.arange(self.classes).repeat_interleave(per_class))
        params = {}
        sizes = self.sizes
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            bound = 1 / math.sqrt(fan_in)
            params[f"layers.{i}.weight"] = (torch.rand(n, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            params[f"layers.{i}.bias"] = (torch.rand(n, fan_out, generator=generator) * 2 - 1) * bound
        dtype = torch.get_default_dtype()
        return ({k: v.to(dtype) for k, v in params.items()},
                {"x": torch.stack(xs).to(dtype), "y": torch.stack(ys)})

    def batch(self, data: dict, generator: torch.Generator) -> Tensor:
        n, m = data["y"].shape
        return torch.randint(m, (n, self.batch_size), generator=generator)

    def _forward(self, params: Params, x: Tensor) -> Tensor:
        act = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}[self.activation]
        layers = len(self.hidden) + 1
        for i in range(layers):
            x = torch.baddbmm(params[f"layers.{i}.bias"].unsqueeze(1), x, params[f"layers.{i}.weight"])
            if i < layers - 1:
                x = act(x)
        return x

    def loss(self, params: Params, data: dict, batch: Tensor | None = None) -> Tensor:
        x, y = data["x"], data["y"]
        if batch is not None:
            rows = torch.arange(len(y)).unsqueeze(1)
            x, y = x[rows, batch], y[rows, batch]
        logits = self._forward(params, x)
        n, b = y.shape
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(n, b).mean(1)

    def full_loss(self, params: Params, data: dict) -> Tensor:
        return self.loss(params, data)


FAMILIES = {"quadratic": Quadratics, "glyph-mlp": GlyphMLP}

#: the optimizee families of the paper, by their command-line names
PRESETS = {
    "quadratic": {"name": "quadratic"},
    "glyphs": {"name": "glyph-mlp"},
    "glyphs-wide": {"name": "glyph-mlp", "hidden": [40]},
    "glyphs-2layer": {"name": "glyph-mlp", "hidden": [20, 20]},
    "glyphs-relu": {"name": "glyph-mlp", "activation": "relu"},
}


def build_family(spec: dict | str, split: str | None = None):
    """A family from its ``spec()`` or preset name; ``split`` replaces the spec's split."""
    spec = dict(PRESETS[spec]) if isinstance(spec, str) else dict(spec)
    name = spec.pop("name")
    if name not in FAMILIES:
        raise ValueError(f"unknown optimizee family '{name}' (known: {', '.join(FAMILIES)})")
    if split is not None:
        spec["split"] = split
    return FAMILIES[name](**spec)


def sample_problems(family, n: int, seed: int) -> tuple[Params, dict]:
    """``n`` problems and their starting points, the same for every optimizer given the same seed."""
    return family.sample(n, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- meta-training
def unroll(rule, meta: Params, family, params: Params, state: Any, data: dict, batch: Any, steps: int,
           generator: torch.Generator, second_order: bool = False) -> tuple[Tensor, Params, Any, Any]:
    """``steps`` updates of ``rule`` from ``params``; returns (meta-loss, params, state, next batch).

    The meta-loss is the mean over the steps and problems of f(θ_t) after each update, on the
    minibatch that then gives that step's gradient. ``params`` and ``state`` come in detached (the
    truncation point); ``batch`` is the minibatch for the first gradient.
    """
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss = family.loss(params, data, batch)
    terms = []
    for _ in range(steps):
        keys = list(params)
        grads = torch.autograd.grad(loss.sum(), [params[k] for k in keys], retain_graph=True,
                                    create_graph=second_order)
        params, state = rule.update(params, dict(zip(keys, grads)), state, meta)
        batch = family.batch(data, generator)
        loss = family.loss(params, data, batch)
        terms.append(loss)
    return torch.stack(terms).mean(), params, state, batch


def detach_state(state: Any) -> Any:
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(v) for v in state)
    return state


def es_meta_gradient(rule, meta: Params, family, params: Params, state: Any, data: dict, batch: Any, steps: int,
                     generator: torch.Generator, config: "L2OConfig", call: int) -> list[Tensor]:
    """The meta-gradient of one truncation's loss by antithetic evolution strategies (``metaphi.outer.es``).

    Every member of the population φ ± σε runs the same truncation: the same starting point, state and
    minibatches (``generator`` is copied, not advanced). The perturbations of call ``call`` come from
    a generator seeded with ``derived_seed(config.seed, call)``, so a resumed run draws the same ones.
    No backward pass through the unroll is needed, nor any derivative of the rule.
    """
    from metaphi.outer.es import antithetic_noise, derived_seed, es_gradient, flatten, unflatten

    keys = list(meta)
    theta = flatten(meta, keys)
    noise = antithetic_noise(config.es_population // 2, theta.numel(),
                             torch.Generator().manual_seed(derived_seed(config.seed, call)), theta.dtype)
    losses = []
    for member in torch.cat([theta + config.es_sigma * noise, theta - config.es_sigma * noise]):
        copy = torch.Generator().manual_seed(0)
        copy.set_state(generator.get_state())
        loss = unroll(rule, unflatten(member, meta, keys), family, params, state, data, batch, steps, copy)[0]
        losses.append(loss.detach())
    flat = es_gradient(torch.stack(losses), noise, config.es_sigma)
    return list(unflatten(flat, meta, keys).values())


@dataclass
class L2OConfig:
    """The meta-training settings of ``meta_train`` (the ``metaphi l2o train`` flags of the same names)."""
    horizon: int = option(100, "optimizee steps per run (T)", check="positive")
    unroll: int = option(20, "steps per truncation (one meta-update each)", check="positive")
    iterations: int = option(100, "optimizee runs", check="positive")
    problems: int = option(1, "problems trained side by side in a run", check="positive")
    meta_lr: float = option(1e-3, "Adam's step size on the meta-parameters", check="positive")
    second_order: bool = option(False, "backpropagate through the optimizee's gradients too (the paper drops "
                                       "these)")
    estimator: str = option("backprop", "meta-gradient by backpropagation through the truncation (backprop), or "
                                        "by antithetic evolution strategies on its loss (es)",
                            choices=("backprop", "es"))
    es_population: int = option(16, "es: population size (even: antithetic pairs)", check="positive",
                                flag="--population")
    es_sigma: float = option(0.01, "es: perturbation scale", check="positive", flag="--sigma")
    clip: float | None = option(1.0, "meta-gradient norm clip (0 or none: off)", check="nonneg")
    seed: int = option(0, "seed of the training problems and minibatches (and, in `metaphi l2o train`, of the "
                          "rule's initial weights)")
    val_every: int = option(10, "validate every this many runs (0: never)", check="nonneg")
    val_problems: int = option(10, "validation problems", check="positive")
    val_seed: int = option(999, "seed of the validation problems")
    checkpoint_every: int = option(5, "write checkpoint.pt every this many runs", check="positive")
    max_seconds: float | None = option(None, "stop after the run in which training time passes this",
                                       check="positive")


@dataclass
class L2OState:
    """Where meta-training stands: φ (``meta``), the plain state of its Adam (``meta_optimizer``), the
    stream of problems and minibatches (``generator``) and the record of the runs so far."""
    meta: Params
    meta_optimizer: dict
    generator: torch.Generator
    iteration: int = 0
    truncations: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list)
    best_meta: Params | None = None
    best_val: float = math.inf
    stopped_early: bool = False


def truncations(horizon: int, unroll_len: int) -> list[int]:
    """The lengths of the pieces a horizon is cut into, e.g. (10, 3) -> [3, 3, 3, 1]."""
    if horizon < 1 or unroll_len < 1:
        raise ValueError("horizon and unroll must be >= 1")
    return [min(unroll_len, horizon - s) for s in range(0, horizon, unroll_len)]


def validate(rule, meta: Params, family, horizon: int, problems: int, seed: int) -> float:
    """Mean final full-data loss of ``problems`` fixed problems trained by the rule for ``horizon`` steps."""
    curve = evaluate_rule(rule, meta, family, horizon, problems, seed, at=[horizon])
    return float(curve[-1].mean())


def meta_train(rule, family, config: L2OConfig, out_dir: str | None = None, resume: bool = False,
               val_family=None, progress: bool = True, on_truncation: Callable[[int, Tensor], None] | None = None
               ) -> L2OState:
    """Meta-train ``rule`` on ``family`` by truncated backpropagation through time (module docstring).

    Each iteration trains ``config.problems`` fresh problems for ``config.horizon`` steps, with one Adam
    step on φ per truncation: one step of the online bilevel loop (``metaphi.train_online``), θ the
    optimizee, each truncation φ's lookahead. With ``out_dir``: ``metrics.jsonl`` (one row per run),
    ``checkpoint.pt`` (the loop's, every ``checkpoint_every`` runs and at the end; ``resume``
    continues from it), ``optimizer.pt`` (the meta-parameters with the best validation loss, or the
    last ones without validation) and ``optimizer-last.pt``, both loadable by
    ``metaphi.inner.optim.LearnedOptimizer``. ``on_truncation(length, meta_loss)`` is called after
    each truncation's meta-update.
    """
    from metaphi import train_online
    from metaphi.inner.optim import save_learned
    from metaphi.inner.rules import TorchAdam

    truncations(config.horizon, config.unroll)  # checks them
    if config.estimator not in ("backprop", "es"):
        raise ValueError(f"unknown meta-gradient estimator '{config.estimator}' (valid: backprop, es)")
    if config.estimator == "es" and (config.es_population < 2 or config.es_population % 2):
        raise ValueError(f"es_population must be an even number >= 2, got {config.es_population}")
    meta = {k: v.detach().clone() for k, v in rule.meta_params(
        family.sample(1, torch.Generator().manual_seed(0))[0]).items()}
    adam = TorchAdam(config.meta_lr)  # torch.optim.Adam's defaults, bit for bit
    ck_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    info = {"family": family.spec(), "horizon": config.horizon, "unroll": config.unroll}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if resume and (not ck_path or not os.path.exists(ck_path)):
        raise FileNotFoundError(f"resume: no checkpoint at {ck_path}")
    start = {"meta": meta, "meta_optimizer": adam.init(meta), "truncations": 0, "seconds": 0.0,
             "best_meta": None, "best_val": math.inf, "stopped_early": False}
    latest = {"state": start}  # the state after the last step, for on_step (which is handed the metrics only)

    def step(state: dict, t: int, generator: torch.Generator) -> tuple[dict, dict]:
        state = one_run(rule, family, config, state, t, generator, adam, val_family or family, on_truncation,
                        ck_path)
        latest["state"] = state
        return state, state.pop("row")

    def write_optimizers(state: dict, iteration: int) -> None:
        save_learned(os.path.join(out_dir, "optimizer-last.pt"), rule, state["meta"], {**info, "iteration": iteration})
        best = state["best_meta"] is not None
        save_learned(os.path.join(out_dir, "optimizer.pt"), rule, state["best_meta"] if best else state["meta"],
                     {**info, "iteration": iteration, "val": state["best_val"] if best else None})

    def on_step(done: int, row: dict) -> None:
        if out_dir and done % config.checkpoint_every == 0:
            write_optimizers(latest["state"], done)

    generator = torch.Generator().manual_seed(config.seed)
    record = train_online.run(
        step, start, config.iterations, generator=generator, checkpoint=ck_path, every=config.checkpoint_every,
        identity={"rule": rule.spec(), "family": family.spec()}, resume=resume, on_step=on_step,
        progress=f"meta-train {rule.spec()['name']}" if progress else None,
        metrics_file=os.path.join(out_dir, "metrics.jsonl") if out_dir else None,
        # the run's own time budget (training time, not validation) ends it; a rule that diverges on the
        # validation problems scores an infinite val, a result rather than a failure
        stop=lambda state: state["stopped_early"], finite=("meta_loss",),
        hint="lower the meta learning rate or clip the meta-gradient")
    final = record["state"]
    if out_dir:
        write_optimizers(final, record["step"])
    return L2OState(meta=final["meta"], meta_optimizer=final["meta_optimizer"], generator=generator,
                    iteration=record["step"], truncations=final["truncations"], seconds=final["seconds"],
                    history=record["history"], best_meta=final["best_meta"], best_val=final["best_val"],
                    stopped_early=final["stopped_early"])


def one_run(rule, family, config: L2OConfig, state: dict, t: int, generator: torch.Generator, adam, val_family,
            on_truncation: Callable[[int, Tensor], None] | None = None, kept: str | None = None) -> dict:
    """Run ``t`` of meta-training: ``config.problems`` fresh problems trained for ``config.horizon`` steps
    by the rule, φ taking one step of ``adam`` after each truncation. Returns the new state (``state``
    is not changed) with its metrics row under "row"; validates every ``val_every`` runs, at the last
    and at the run that ends the time budget (``max_seconds``, time in training, not validation)."""
    from metaphi.train import NonFiniteLoss

    started = time.perf_counter()
    meta, meta_opt, count = state["meta"], state["meta_optimizer"], state["truncations"]
    params, data = family.sample(config.problems, generator)
    rule_state = rule.init(params)
    batch = family.batch(data, generator)
    losses = []
    for length in truncations(config.horizon, config.unroll):
        if config.estimator == "es":
            grads = es_meta_gradient(rule, meta, family, params, rule_state, data, batch, length, generator,
                                     config, count)
            loss, params, rule_state, batch = unroll(rule, meta, family, params, rule_state, data, batch, length,
                                                     generator)
        else:
            leaves = {k: v.detach().requires_grad_() for k, v in meta.items()}
            loss, params, rule_state, batch = unroll(rule, leaves, family, params, rule_state, data, batch, length,
                                                     generator, config.second_order)
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, meta.values())]
        if not math.isfinite(float(loss.detach())) or not all(torch.isfinite(g).all() for g in grads):
            raise NonFiniteLoss(f"the meta-loss became {float(loss.detach())} in run {t + 1}; the last checkpoint "
                                f"is kept in {kept or '(no out_dir)'}. Lower the meta learning rate or clip the "
                                f"meta-gradient.")
        if config.clip:
            torch.nn.utils.clip_grad_norm_(grads, config.clip)
        meta, meta_opt = adam.update(meta, dict(zip(meta, grads)), meta_opt, {})
        count += 1
        losses.append(float(loss.detach()))
        if on_truncation:
            on_truncation(length, loss.detach())
        params, rule_state = detach(params), detach_state(rule_state)
    iteration = t + 1
    seconds = state["seconds"] + time.perf_counter() - started
    row = {"iteration": iteration, "meta_loss": sum(losses) / len(losses),
           "final_loss": float(family.full_loss(params, data).mean()), "seconds": round(seconds, 3)}
    stopped = config.max_seconds is not None and seconds >= config.max_seconds and iteration < config.iterations
    best_meta, best_val = state["best_meta"], state["best_val"]
    if config.val_every and (iteration % config.val_every == 0 or iteration == config.iterations or stopped):
        row["val"] = validate(rule, meta, val_family, config.horizon, config.val_problems, config.val_seed)
        if row["val"] < best_val:
            best_val, best_meta = row["val"], {k: v.detach().clone() for k, v in meta.items()}
    return {"meta": meta, "meta_optimizer": meta_opt, "truncations": count, "seconds": seconds,
            "best_meta": best_meta, "best_val": best_val, "stopped_early": stopped, "row": row}


# --------------------------------------------------------------------------------------- evaluation
def evaluate_optimizer(make_optimizer: Callable[[list[tuple[str, Tensor]]], torch.optim.Optimizer], family,
                       horizon: int, problems: int, seed: int, at: Iterable[int] | None = None) -> Tensor:
    """Full-data losses [horizon + 1, problems] of fixed problems trained by a ``torch.optim`` optimizer.

    Problems, starting points and minibatches depend on ``seed`` only, so all optimizers see the same
    ones. The loss is measured after every step, or only after the steps in ``at`` (NaN elsewhere).
    A problem whose loss stops being finite is marked ``inf`` from then on.
    """
    params0, data = sample_problems(family, problems, seed)
    params = {k: v.clone().requires_grad_() for k, v in params0.items()}
    opt = make_optimizer(list(params.items()))
    g = torch.Generator().manual_seed(seed + 1)
    at = set(range(horizon + 1)) if at is None else set(at)
    curve = torch.full((horizon + 1, problems), math.nan)
    diverged = torch.zeros(problems, dtype=torch.bool)
    for t in range(horizon + 1):
        if t > 0:
            batch = family.batch(data, g)
            opt.zero_grad(set_to_none=True)
            loss = family.loss(params, data, batch)
            diverged |= ~torch.isfinite(loss.detach())
            loss.sum().backward()
            opt.step()
        if t in at:
            with torch.no_grad():
                curve[t] = family.full_loss(params, data)
            diverged |= ~torch.isfinite(curve[t])
        curve[t, diverged] = math.inf
    return curve


def evaluate_rule(rule, meta: Params, family, horizon: int, problems: int, seed: int,
                  at: Iterable[int] | None = None) -> Tensor:
    """``evaluate_optimizer`` for a learned rule, run through ``LearnedOptimizer``."""
    from metaphi.inner.optim import LearnedOptimizer

    return evaluate_optimizer(lambda named: LearnedOptimizer(named, (rule, meta)), family, horizon, problems, seed,
                              at)


#: hand-designed optimizers compared against; each takes the learning rate
BASELINES: dict[str, Callable[[list, float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "nesterov": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}
#: half-decades from 1e-4 to 10
LR_GRID = tuple(round(10 ** (k / 2), 6) for k in range(-8, 3))


def baseline(name: str, lr: float):
    make = BASELINES[name]
    return lambda named: make([p for _, p in named], lr)


def tune_learning_rate(name: str, family, horizons: Iterable[int], problems: int, seed: int,
                       grid: Iterable[float] = LR_GRID) -> dict[int, dict]:
    """For each horizon, the grid rate with the lowest mean final loss on problems drawn with ``seed``.

    One run of the longest horizon per rate serves every horizon: a constant-rate optimizer's first
    steps do not depend on how long it will run.
    """
    horizons = sorted(set(horizons))
    scores = {}
    for lr in grid:
        curve = evaluate_optimizer(baseline(name, lr), family, horizons[-1], problems, seed, at=horizons)
        scores[lr] = {h: float(curve[h].mean()) for h in horizons}
    out = {}
    for h in horizons:
        best = min(scores, key=lambda lr: (scores[lr][h], lr))
        out[h] = {"lr": best, "tuning_loss": scores[best][h], "grid": {str(lr): s[h] for lr, s in scores.items()}}
    return out


def summarize(curve: Tensor, horizons: Iterable[int]) -> dict:
    """Mean final loss ± 95% CI (Student t) over problems at each horizon, and each problem's."""
    from metaphi.evaluate import mean_ci95

    out = {}
    for h in horizons:
        values = curve[h]
        finite = torch.isfinite(values).all()
        out[str(h)] = {"mean": float(values.mean()), "ci95": mean_ci95(values.tolist())[1] if finite else math.inf,
                       "diverged": int((~torch.isfinite(values)).sum()), "values": [float(v) for v in values]}
    return out


# ------------------------------------------------------------------------------- the study: train, eval
def _progress(quiet: bool) -> bool:
    return not quiet and (sys.stderr.isatty() or os.environ.get("METAPHI_PROGRESS") == "1")


@dataclass
class L2OTrainConfig(L2OConfig):
    """``metaphi l2o train``: the meta-training settings (``L2OConfig``) and what the study adds around them."""
    rule: str = option("lstm", "the learned update rule", choices=RULE_NAMES)
    family: str = option("quadratic", "optimizee family", choices=tuple(PRESETS))
    lr: float | None = option(None, "starting step size of per-layer-sgd / schedule-sgd (0.1) and mlp-rule "
                                    "(Adam's, 0.01)", check="positive")
    eval_problems: int = option(20, "test problems scored at the end", check="positive")
    eval_seed: int = option(1234, "seed of the test problems")
    threads: int | None = option(None, "torch CPU threads (none: torch's choice)", check="positive")
    out: str | None = option(None, "output folder for checkpoint.pt, metrics.jsonl, optimizer.pt, result.json, "
                                   "config.yaml (none: runs/l2o-RULE-FAMILY-seedS)")
    resume: bool = option(False, "continue the run in --out from its checkpoint")
    quiet: bool = option(False, "no progress bar")


def run_train(config: L2OTrainConfig) -> dict:
    """Meta-train ``config.rule`` on the train split of ``config.family``, keep the meta-parameters best on
    the validation split, and score them on ``eval_problems`` test problems.

    Writes into ``out``: config.yaml (the resolved config; ``--config`` it with another ``--out`` to run
    again), metrics.jsonl, checkpoint.pt, optimizer.pt, optimizer-last.pt (``meta_train``) and result.json.
    """
    from metaphi.config import writable_dir
    from metaphi.experiments.report import machine, save_config, write_json
    from metaphi.inner.learned import make_rule
    from metaphi.inner.optim import load_learned

    if config.es_population < 2 or config.es_population % 2:
        raise UsageError(f"--population must be an even number >= 2 (antithetic pairs), got {config.es_population}")
    if config.threads:
        torch.set_num_threads(config.threads)
    out = config.out or os.path.join("runs", f"l2o-{config.rule}-{config.family}-seed{config.seed}")
    if config.resume and not os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise UsageError(f"--resume: no checkpoint in {out}; leave out --resume to start a new run")
    writable_dir(out)
    family = build_family(config.family, split="train")
    val_family = build_family(config.family, split="val")
    test_family = build_family(config.family, split="test")
    rule = make_rule(config.rule, config.lr, config.horizon, config.seed)
    save_config(replace(config, out=out, resume=False), out, "l2o train")  # what reruns it: from the start, into its --out
    started = time.perf_counter()
    try:
        state = meta_train(rule, family, config, out_dir=out, resume=config.resume, val_family=val_family,
                           progress=_progress(config.quiet))
    except ValueError as e:  # a checkpoint of another configuration, or not a checkpoint
        raise UsageError(str(e))
    rule, meta, info = load_learned(os.path.join(out, "optimizer.pt"))
    curve = evaluate_rule(rule, meta, test_family, config.horizon, config.eval_problems, config.eval_seed,
                          at=[config.horizon])
    result = {"rule": rule.spec(), "family": config.family, "family_spec": family.spec(), "config": to_dict(config),
              "iterations": state.iteration, "truncations": state.truncations, "stopped_early": state.stopped_early,
              "train_seconds": state.seconds, "best_val": None if state.best_meta is None else state.best_val,
              "test": summarize(curve, [config.horizon]), "eval_problems": config.eval_problems,
              "eval_seed": config.eval_seed, "wall_seconds": time.perf_counter() - started, "machine": machine(),
              "optimizer": os.path.join(out, "optimizer.pt")}
    write_json(result, os.path.join(out, "result.json"))
    test = result["test"][str(config.horizon)]
    print(f"{config.rule} on {config.family}: final loss after {config.horizon} steps {test['mean']:.4g} ± "
          f"{test['ci95']:.2g} ({config.eval_problems} test problems), {state.iteration} runs in {state.seconds:.0f} s")
    print(f"wrote {os.path.join(out, 'result.json')} and {os.path.join(out, 'optimizer.pt')}")
    return result


@dataclass
class L2OEvalConfig:
    """``metaphi l2o eval``: learned optimizers against hand-designed ones tuned on a grid."""
    optimizers: list[str] = option(default_factory=list, help="learned optimizer files (optimizer.pt)",
                                   positional=True)
    family: str = option("quadratic", "optimizee family", choices=tuple(PRESETS))
    horizons: list[int] = option(default_factory=lambda: [100, 200], help="optimizee steps at which losses are "
                                 "compared", check="positive")
    problems: int = option(20, "test problems (seeds)", check="positive")
    seed: int = option(1234, "seed of the test problems")
    baselines: list[str] = option(default_factory=lambda: list(BASELINES), help="hand-designed optimizers, each "
                                  "with its learning rate tuned on --grid", choices=tuple(BASELINES))
    grid: list[float] | None = option(None, "learning rates tried (none: 1e-4 .. 10 in half-decades)",
                                      check="positive")
    tune_problems: int = option(10, "problems the learning rates are tuned on", check="positive")
    tune_seed: int = option(77, "seed of the tuning problems")
    threads: int | None = option(None, "torch CPU threads (none: torch's choice)", check="positive")
    out: str | None = option(None, "write the result JSON here", check="output_file")
    quiet: bool = option(False, "no progress bar")


def run_eval(config: L2OEvalConfig) -> dict:
    """Every optimizer's mean final loss ± 95% CI at each horizon on the same test problems (``compare``);
    prints the table and writes the result (with the resolved config) to ``out`` when given."""
    from metaphi.experiments.report import machine, write_json
    from metaphi.inner.optim import load_learned

    if config.threads:
        torch.set_num_threads(config.threads)
    if not config.horizons:
        raise UsageError("--horizons: give at least one horizon")
    learned = {}
    for path in config.optimizers:
        try:
            rule, meta, _ = load_learned(path)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e))
        label = f"{rule.spec()['name']}:{os.path.basename(os.path.dirname(os.path.abspath(path)))}"
        learned[label] = (rule, meta)
    if not learned and not config.baselines:
        raise UsageError("nothing to evaluate: give learned optimizer files or --baselines")
    started = time.perf_counter()
    horizons = sorted(set(config.horizons))
    result = compare(config.family, learned, horizons, config.problems, config.seed, config.baselines, config.grid,
                     config.tune_problems, config.tune_seed, progress=_progress(config.quiet))
    result.update({"family": config.family, "horizons": horizons, "problems": config.problems, "seed": config.seed,
                   "tune_problems": config.tune_problems, "tune_seed": config.tune_seed,
                   "optimizers": list(config.optimizers), "wall_seconds": time.perf_counter() - started,
                   "machine": machine(), "config": to_dict(config)})
    print(format_rows(f"{config.family}: mean final loss ± 95% CI over {config.problems} test problems "
                      f"(seed {config.seed})", result["rows"], horizons))
    if config.out:
        write_json(result, config.out)
        print(f"wrote {config.out}")
    return result


def compare(family_name: str, learned: dict, horizons: list[int], problems: int, seed: int, baselines: list[str],
            grid, tune_problems: int, tune_seed: int, progress: bool = False) -> dict:
    """Every optimizer's final loss at each horizon on the same test problems; baselines tuned first.

    ``learned`` maps a label to ``(rule, meta)``. Returns ``{"rows": {label: row}, "curves": {label:
    mean loss per step}}``; a row holds ``{str(horizon): {mean, ci95, diverged[, lr]}}``.
    """
    from tqdm.auto import tqdm

    test_family = build_family(family_name, split="test")
    tune_family = build_family(family_name, split="val")
    top = max(horizons)
    rows, curves = {}, {}
    jobs = [("baseline", b) for b in baselines] + [("learned", k) for k in learned]
    for kind, label in tqdm(jobs, desc=f"eval {family_name}", disable=not progress, leave=False):
        started = time.perf_counter()
        if kind == "baseline":
            tuned = tune_learning_rate(label, tune_family, horizons, tune_problems, tune_seed, grid or LR_GRID)
            row = {}
            by_lr = {}
            for h in horizons:
                lr = tuned[h]["lr"]
                if lr not in by_lr:
                    by_lr[lr] = evaluate_optimizer(baseline(label, lr), test_family, top, problems, seed)
                row[str(h)] = {**summarize(by_lr[lr], [h])[str(h)], "lr": lr, "tuning_grid": tuned[h]["grid"]}
            curve = by_lr[tuned[top]["lr"]]
        else:
            rule, meta = learned[label]
            try:
                curve = evaluate_rule(rule, meta, test_family, top, problems, seed)
            except ValueError as e:  # a per-layer rule on a net with other tensors
                rows[label] = {"error": str(e)}
                continue
            row = summarize(curve, horizons)
        row["seconds"] = time.perf_counter() - started
        rows[label] = row
        curves[label] = [float(v) for v in torch.where(torch.isfinite(curve), curve, torch.nan).nanmean(1)]
    return {"rows": rows, "curves": curves}


def format_rows(title: str, rows: dict, horizons: list[int]) -> str:
    """The rows of ``compare`` as a fixed-width table for the terminal: mean ± CI (tuned rate) per horizon."""
    lines = [title, f"{'optimizer':<16}" + "".join(f"{'T=' + str(h):>26}" for h in horizons)]
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"{label:<16} n/a ({row['error'][:60]})")
            continue
        cells = []
        for h in horizons:
            r = row[str(h)]
            cell = f"{r['mean']:.4g} ± {r['ci95']:.2g}" if r["diverged"] == 0 else f"diverged ({r['diverged']})"
            if "lr" in r:
                cell += f" (lr {r['lr']:g})"
            cells.append(f"{cell:>26}")
        lines.append(f"{label:<16}" + "".join(cells))
    return "\n".join(lines)
