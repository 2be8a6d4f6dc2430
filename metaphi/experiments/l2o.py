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
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from metaphi.functional import Params, detach

CHECKPOINT_FORMAT = "metaphi-l2o-1"


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
    horizon: int = 100           # optimizee steps per run (T)
    unroll: int = 20             # steps per truncation: one meta-update each
    iterations: int = 100        # optimizee runs
    problems: int = 1            # problems trained side by side in one run
    meta_lr: float = 1e-3
    second_order: bool = False
    estimator: str = "backprop"  # or "es": antithetic evolution strategies on each truncation's loss
    es_population: int = 16
    es_sigma: float = 0.01
    clip: float | None = 1.0     # meta-gradient norm clip (None: off)
    seed: int = 0
    val_every: int = 10          # validate every this many runs (0: never)
    val_problems: int = 10
    val_seed: int = 999
    checkpoint_every: int = 5
    max_seconds: float | None = None   # stop after the run in which training time passes this


@dataclass
class L2OState:
    meta: Params
    optimizer: torch.optim.Optimizer
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
    step on φ per truncation. With ``out_dir``: ``metrics.jsonl`` (one row per run),
    ``checkpoint.pt`` (every ``checkpoint_every`` runs and at the end), ``optimizer.pt`` (the
    meta-parameters with the best validation loss, or the last ones without validation) and
    ``optimizer-last.pt``, both loadable by ``metaphi.inner.optim.LearnedOptimizer``.
    ``on_truncation(length, meta_loss)`` is called after each truncation's meta-update.
    """
    from tqdm.auto import tqdm

    from metaphi.inner.optim import save_learned
    from metaphi.tasks import atomic_save
    from metaphi.train import NonFiniteLoss

    pieces = truncations(config.horizon, config.unroll)
    if config.estimator not in ("backprop", "es"):
        raise ValueError(f"unknown meta-gradient estimator '{config.estimator}' (valid: backprop, es)")
    if config.estimator == "es" and (config.es_population < 2 or config.es_population % 2):
        raise ValueError(f"es_population must be an even number >= 2, got {config.es_population}")
    meta = {k: v.detach().clone().requires_grad_() for k, v in rule.meta_params(
        family.sample(1, torch.Generator().manual_seed(0))[0]).items()}
    state = L2OState(meta, torch.optim.Adam(list(meta.values()), lr=config.meta_lr),
                     torch.Generator().manual_seed(config.seed))
    ck_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    info = {"family": family.spec(), "horizon": config.horizon, "unroll": config.unroll}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if resume:
        if not ck_path or not os.path.exists(ck_path):
            raise FileNotFoundError(f"resume: no checkpoint at {ck_path}")
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        if ck.get("format") != CHECKPOINT_FORMAT or ck["rule"] != rule.spec() or ck["family"] != family.spec():
            raise ValueError(f"resume: {ck_path} was written for another rule or family")
        for k, v in ck["meta"].items():
            state.meta[k].data.copy_(v)
        state.optimizer.load_state_dict(ck["meta_optimizer"])
        state.generator.set_state(ck["generator"])
        for name in ("iteration", "truncations", "seconds", "history", "best_val"):
            setattr(state, name, ck[name])
        state.best_meta = ck["best_meta"]
    if out_dir:
        with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
            for row in state.history:
                f.write(json.dumps(row) + "\n")

    def save() -> None:
        if not out_dir:
            return
        atomic_save({"format": CHECKPOINT_FORMAT, "rule": rule.spec(), "family": family.spec(),
                     "config": asdict(config), "meta": detach(state.meta),
                     "meta_optimizer": state.optimizer.state_dict(), "generator": state.generator.get_state(),
                     "iteration": state.iteration, "truncations": state.truncations, "seconds": state.seconds,
                     "history": state.history, "best_meta": state.best_meta, "best_val": state.best_val,
                     "stopped_early": state.stopped_early}, ck_path)
        save_learned(os.path.join(out_dir, "optimizer-last.pt"), rule, state.meta,
                     {**info, "iteration": state.iteration})
        save_learned(os.path.join(out_dir, "optimizer.pt"), rule, state.best_meta or state.meta,
                     {**info, "iteration": state.iteration, "val": state.best_val if state.best_meta else None})

    bar = tqdm(total=config.iterations, initial=state.iteration, desc=f"meta-train {rule.spec()['name']}",
               disable=not progress, dynamic_ncols=True)
    try:
        while state.iteration < config.iterations and not state.stopped_early:
            started = time.perf_counter()
            params, data = family.sample(config.problems, state.generator)
            rule_state = rule.init(params)
            batch = family.batch(data, state.generator)
            losses = []
            for length in pieces:
                if config.estimator == "es":
                    grads = es_meta_gradient(rule, detach(state.meta), family, params, rule_state, data, batch, length,
                                             state.generator, config, state.truncations)
                    loss, params, rule_state, batch = unroll(rule, detach(state.meta), family, params, rule_state, data,
                                                             batch, length, state.generator)
                else:
                    loss, params, rule_state, batch = unroll(rule, state.meta, family, params, rule_state, data, batch,
                                                             length, state.generator, config.second_order)
                    grads = torch.autograd.grad(loss, list(state.meta.values()), allow_unused=True)
                    grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, state.meta.values())]
                if not math.isfinite(float(loss.detach())) or not all(torch.isfinite(g).all() for g in grads):
                    save()
                    raise NonFiniteLoss(f"the meta-loss became {float(loss.detach())} in run {state.iteration + 1}; the last "
                                        f"good state is kept in {ck_path or '(no out_dir)'}. Lower the meta learning "
                                        f"rate or clip the meta-gradient.")
                if config.clip:
                    torch.nn.utils.clip_grad_norm_(grads, config.clip)
                for p, g in zip(state.meta.values(), grads):
                    p.grad = g
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
                state.truncations += 1
                losses.append(float(loss.detach()))
                if on_truncation:
                    on_truncation(length, loss.detach())
                params, rule_state = detach(params), detach_state(rule_state)
            state.iteration += 1
            state.seconds += time.perf_counter() - started
            row = {"iteration": state.iteration, "meta_loss": sum(losses) / len(losses),
                   "final_loss": float(family.full_loss(params, data).mean()), "seconds": round(state.seconds, 3)}
            if config.max_seconds is not None and state.seconds >= config.max_seconds:
                state.stopped_early = state.iteration < config.iterations
            if config.val_every and (state.iteration % config.val_every == 0 or state.iteration == config.iterations
                                     or state.stopped_early):
                row["val"] = validate(rule, detach(state.meta), val_family or family, config.horizon,
                                      config.val_problems, config.val_seed)
                if row["val"] < state.best_val:
                    state.best_val, state.best_meta = row["val"], {k: v.detach().clone() for k, v in state.meta.items()}
            state.history.append(row)
            if out_dir:
                with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
            if state.iteration % config.checkpoint_every == 0:
                save()
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("meta_loss", "final_loss", "val")})
            bar.update(1)
    finally:
        bar.close()
    save()
    return state


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
