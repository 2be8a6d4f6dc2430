"""Sample reweighting: learn how much each training example counts, from a small clean meta set.

The "task" is one data set: a training split (noisy labels, or long-tailed classes) and a small,
clean, balanced meta split. φ decides the weight w_i of every training example in a batch; it is
judged by the meta loss after one step of training with those weights (a one-step lookahead):

    θ'(φ) = θ − α ∇_θ Σ_i w_i(φ) ℓ_i(θ)          ℓ_i = CE(f_θ(x_i), y_i), a virtual step
    L_meta(φ) = mean_j CE(f_θ'(φ)(x_j), y_j)        over the clean meta batch

This is exactly an ``Algorithm.task_loss`` with Task(support = training batch, query = meta batch):
``WeightedLookahead`` below learns the support by one SGD step of ``metaphi.inner.adapt`` on the
weighted loss, and any estimator of ``metaphi.outer`` turns L_meta into ∇_φ (the unrolled
second-order one by default; θ enters as a constant, so the first-order estimator gives the same
number: both differentiate through the weighted gradient; ES needs only values of L_meta).

**Learning to Reweight Examples** (L2RW; Ren, Zeng, Yang & Urtasun 2018). φ = ε ∈ R^n, the weights
themselves, perturbed around zero; the weights are the clipped, normalised negative meta-gradient:

    u_i = −∂L_meta/∂ε_i |_{ε=0} = α ∇_θ ℓ_i(θ) · ∇_θ L_meta(θ)
    w̃_i = max(u_i, 0),     w_i = w̃_i / Σ_j w̃_j   (all zero when every u_i ≤ 0)

An example counts when its gradient points the way the clean set's gradient does; a mislabelled one
usually points against it and gets weight 0. The weights are recomputed from scratch at every step
(nothing is carried over). Two ways to compute u, equal up to rounding:

- ``"lookahead"``: ∂/∂ε through the virtual step by the ``Unrolled`` estimator (one double backward);
- ``"jvp"``: u = α J g with J the per-example Jacobian of the losses and g = ∇_θ L_meta(θ), which is
  one forward-mode derivative of the loss vector along g (``torch.func.jvp``): no per-example
  gradients are stored and no second derivatives are formed. The default, the cheapest.

**Meta-Weight-Net** (MW-Net; Shu, Xie, Yi, Zhao, Zhou, Xu & Meng 2019). φ = a one-hidden-layer MLP
V(ℓ; φ) = sigmoid(W₂ relu(W₁ ℓ + b₁) + b₂), 1 → 100 → 1, mapping an example's loss to its weight;
it is trained alongside the classifier, one meta step per training step:

    1. virtual step: w_i = V(ℓ_i(θ); φ) / Σ_j V(ℓ_j(θ); φ), θ'(φ) as above (α = the current lr)
    2. φ ← Adam(φ, ∇_φ L_meta(φ))               (lr 1e-3, weight decay 1e-4, as the authors' code)
    3. θ ← SGD(θ, ∇_θ Σ_i w_i ℓ_i(θ)) with w_i = V(ℓ_i(θ); φ_new) / Σ_j V(ℓ_j(θ); φ_new), held constant

The loss fed to V is a constant (the authors' code feeds ``loss.data``), and the weights are
normalised to sum to one over the batch as in the authors' code (the paper's equations write a
1/n mean instead; ``normalize=False`` gives that). With the sum normalisation the virtual step's
size α matters only through the curvature seen by the lookahead.

Plain training is the same loop with w_i = 1/n.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.algorithms.base import Algorithm
from metaphi.evaluate import mean_ci95
from metaphi.functional import Params, accuracy, call, detach, params_of
from metaphi.inner import SGD, adapt
from metaphi.tasks import Task
from metaphi.tasks.registry import load_named as load_data

METHODS = ("plain", "plain-meta", "l2rw", "mwnet")
L2RW_MODES = ("jvp", "lookahead")
MWNET_ESTIMATORS = ("second-order", "first-order", "es")


def per_example_losses(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """ℓ_i = CE(f_θ(x_i), y_i) for every example, shape [n]."""
    return F.cross_entropy(call(model, params, x), y, reduction="none")


class MetaWeightNet(nn.Module):
    """V(ℓ; φ): an example's loss → its weight in (0, 1) (Shu et al. 2019: 1 → 100 → 1, ReLU, sigmoid)."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.spec = {"name": "mwnet", "hidden": hidden}
        self.hidden = nn.Linear(1, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, losses: Tensor) -> Tensor:
        return torch.sigmoid(self.out(torch.relu(self.hidden(losses.unsqueeze(-1))))).squeeze(-1)


def normalized(weights: Tensor) -> Tensor:
    """w / Σ w, or zeros when Σ w = 0 (L2RW: a batch where no example helps takes no step)."""
    total = weights.sum()
    return weights / torch.where(total > 0, total, torch.ones_like(total))


class WeightedLookahead(Algorithm):
    """One virtual SGD step on a weighted training batch, judged on a clean meta batch.

    ``weigh(phi, losses)`` gives the weights [n] of the batch's examples from φ and their losses at θ
    (constants). The model's weights θ (``params``) are constants of φ: a new lookahead is built for
    every training step. Task = (support = (x, y) training batch, query = (x, y) meta batch).
    """

    name = "reweight-lookahead"
    estimators = ("second-order", "first-order")

    def __init__(self, model: nn.Module, params: Params, lr: float, weigh: Callable[[Params, Tensor], Tensor]):
        self.model, self.params, self.lr, self.weigh = model, detach(params), float(lr), weigh

    def weights(self, phi: Params, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            losses = per_example_losses(self.model, self.params, x, y)
        return self.weigh(phi, losses)

    def task_loss(self, phi: Params, task: Task, first_order: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        (x, y), (x_meta, y_meta) = task
        w = self.weights(phi, x, y)
        theta = adapt(lambda p: (w * per_example_losses(self.model, p, x, y)).sum(), self.params, SGD(self.lr), {}, 1)
        logits = call(self.model, theta, x_meta)
        return F.cross_entropy(logits, y_meta), {"accuracy": (logits.argmax(-1) == y_meta).float().mean()}


def _one(task: Task) -> Task:
    return Task.stack([task])


def l2rw_scores(model: nn.Module, params: Params, batch: tuple[Tensor, Tensor], meta: tuple[Tensor, Tensor],
                lr: float, mode: str = "jvp") -> Tensor:
    """u_i = −∂L_meta/∂ε_i at ε = 0 (Ren et al. 2018), by ``mode`` "jvp" or "lookahead" (equal)."""
    if mode == "lookahead":
        from metaphi.outer import build_estimator
        x = batch[0]
        eps = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device, requires_grad=True)
        algo = WeightedLookahead(model, params, lr, lambda phi, losses: phi["eps"])
        grads, _ = build_estimator("second-order")(algo, {"eps": eps}, _one(Task(batch, meta)))
        return -grads["eps"]
    if mode != "jvp":
        raise ValueError(f"L2RW mode must be one of {', '.join(L2RW_MODES)}, got {mode!r}")
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    meta_loss = F.cross_entropy(call(model, theta, meta[0]), meta[1])
    g = dict(zip(theta, torch.autograd.grad(meta_loss, list(theta.values()))))
    _, directional = torch.func.jvp(lambda p: per_example_losses(model, p, *batch), (detach(theta),), (g,))
    return lr * directional.detach()


def l2rw_weights(scores: Tensor) -> Tensor:
    """w_i = max(u_i, 0) / Σ_j max(u_j, 0), zeros if no u_i is positive."""
    return normalized(scores.clamp(min=0))


def mwnet_weigh(net: MetaWeightNet, normalize: bool = True) -> Callable[[Params, Tensor], Tensor]:
    """φ, losses ↦ V(ℓ; φ), normalised to sum to one (the authors' code) or divided by n (the paper)."""
    def weigh(phi: Params, losses: Tensor) -> Tensor:
        v = call(net, phi, losses)
        return normalized(v) if normalize else v / v.shape[0]
    return weigh


@dataclass
class ReweightConfig:
    epochs: int = 100
    batch: int = 100
    lr: float = 0.03              # SGD (momentum) step size of the classifier
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_at: tuple = (0.6, 0.8)  # fractions of training after which the lr is multiplied by 0.1
    lookahead_lr: float | None = None  # α of the virtual step; default: the current lr
    meta_batch: int | None = None  # clean images per meta step; default all of them
    l2rw_mode: str = "jvp"
    mwnet_hidden: int = 100
    mwnet_lr: float = 1e-3
    mwnet_weight_decay: float = 1e-4
    mwnet_normalize: bool = True
    mwnet_estimator: str = "second-order"
    es_population: int = 16
    es_sigma: float = 0.01

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lr_decay_at"] = list(self.lr_decay_at)
        return d

    def check(self) -> None:
        for name in ("epochs", "batch", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.meta_batch is not None and self.meta_batch < 1:
            raise ValueError(f"meta_batch must be positive, got {self.meta_batch}")
        if self.l2rw_mode not in L2RW_MODES:
            raise ValueError(f"L2RW mode must be one of {', '.join(L2RW_MODES)}, got {self.l2rw_mode!r}")
        if self.mwnet_estimator not in MWNET_ESTIMATORS:
            raise ValueError(f"MW-Net estimator must be one of {', '.join(MWNET_ESTIMATORS)}, "
                             f"got {self.mwnet_estimator!r}")


def lr_at(cfg: ReweightConfig, epoch: int) -> float:
    return cfg.lr * 0.1 ** sum(epoch >= round(f * cfg.epochs) for f in cfg.lr_decay_at)


def train(method: str, model: nn.Module, params: Params, train_set: tuple[Tensor, Tensor],
          meta_set: tuple[Tensor, Tensor] | None, cfg: ReweightConfig, generator: torch.Generator,
          noisy: Tensor | None = None, mwnet_params: Params | None = None,
          on_epoch: Callable[[int, dict], None] | None = None) -> tuple[Params, dict]:
    """Train ``model`` from ``params`` on ``train_set`` with ``method``'s example weights.

    "plain" (and "plain-meta", whose caller has already merged the meta set into ``train_set``)
    weighs every example 1/n; "l2rw" and "mwnet" weigh by the lookahead on ``meta_set``.
    ``generator`` decides the batch order and the meta batches and nothing else. ``noisy`` (bool [N])
    marks corrupted training labels, for the share of weight they receive. ``mwnet_params``: V's
    initial φ (default: a fresh net from ``generator``). Returns (params, history) where history has
    per-epoch "loss", "lr", "noisy_weight_share", "zero_weight_share" and, for MW-Net, the final φ.
    """
    cfg.check()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in ("l2rw", "mwnet") and meta_set is None:
        raise ValueError(f"{method} needs a clean meta set")
    x, y = train_set
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(list(theta.values()), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    vnet = phi = phi_opt = estimator = None
    if method == "mwnet":
        from metaphi.outer import build_estimator
        vnet = MetaWeightNet(cfg.mwnet_hidden)
        if mwnet_params is None:
            with torch.random.fork_rng():  # V's initial weights come from the run's generator alone
                torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
                vnet = MetaWeightNet(cfg.mwnet_hidden)
            mwnet_params = params_of(vnet)
        phi = {k: v.detach().clone().to(x.dtype).requires_grad_(True) for k, v in mwnet_params.items()}
        phi_opt = torch.optim.Adam(list(phi.values()), lr=cfg.mwnet_lr, weight_decay=cfg.mwnet_weight_decay)
        options = {}
        if cfg.mwnet_estimator == "es":
            options = {"population": cfg.es_population, "sigma": cfg.es_sigma,
                       "seed": int(torch.randint(2 ** 62, (1,), generator=generator))}
        estimator = build_estimator(cfg.mwnet_estimator, **options)
    history: dict = {"loss": [], "lr": [], "noisy_weight_share": [], "zero_weight_share": [], "meta_loss": []}
    for epoch in range(cfg.epochs):
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        alpha = cfg.lookahead_lr or lr
        order = torch.randperm(len(y), generator=generator)
        sums = {"loss": 0.0, "noisy": 0.0, "zero": 0.0, "meta": 0.0}
        steps = 0
        for i in range(0, len(y), cfg.batch):
            idx = order[i:i + cfg.batch]
            bx, by = x[idx], y[idx]
            meta = None
            if meta_set is not None and method in ("l2rw", "mwnet"):
                meta = meta_set
                if cfg.meta_batch is not None and cfg.meta_batch < len(meta_set[1]):
                    pick = torch.randperm(len(meta_set[1]), generator=generator)[:cfg.meta_batch]
                    meta = (meta_set[0][pick], meta_set[1][pick])
            if method == "l2rw":
                w = l2rw_weights(l2rw_scores(model, theta, (bx, by), meta, alpha, cfg.l2rw_mode))
            elif method == "mwnet":
                algo = WeightedLookahead(model, theta, alpha, mwnet_weigh(vnet, cfg.mwnet_normalize))
                grads, metrics = estimator(algo, phi, _one(Task((bx, by), meta)))
                phi_opt.zero_grad(set_to_none=True)
                for k, v in phi.items():
                    v.grad = grads[k]
                phi_opt.step()
                sums["meta"] += metrics["loss"]
                with torch.no_grad():
                    w = algo.weights(detach(phi), bx, by)
            else:
                w = torch.full((len(idx),), 1.0 / len(idx), dtype=x.dtype)
            w = w.detach()
            loss = (w * per_example_losses(model, theta, bx, by)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"{method}: the training loss became {float(loss)} in epoch {epoch + 1}; "
                                         f"lower --lr")
            sums["loss"] += float(loss.detach())
            total = float(w.sum())
            if noisy is not None and total > 0:
                sums["noisy"] += float(w[noisy[idx]].sum()) / total
            sums["zero"] += float((w <= 0).float().mean())
            steps += 1
        history["loss"].append(sums["loss"] / steps)
        history["lr"].append(lr)
        history["noisy_weight_share"].append(sums["noisy"] / steps if noisy is not None else None)
        history["zero_weight_share"].append(sums["zero"] / steps)
        history["meta_loss"].append(sums["meta"] / steps if method == "mwnet" else None)
        if on_epoch is not None:
            on_epoch(epoch, {"params": detach(theta), **{k: v[-1] for k, v in history.items()}})
    if phi is not None:
        history["mwnet_params"] = detach(phi)
    return detach(theta), history


# -- the data of one run: a clean test split, a clean meta split and a corrupted training split --

@dataclass
class Corruption:
    noise: str = "none"        # none | uniform | flip
    noise_rate: float = 0.0
    imbalance: float = 1.0     # largest / smallest training class (1 = balanced)

    def to_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        parts = []
        if self.noise != "none":
            parts.append(f"{self.noise} noise {100 * self.noise_rate:g}%")
        if self.imbalance != 1:
            parts.append(f"imbalance {self.imbalance:g}")
        return ", ".join(parts) or "clean"


def make_splits(data, meta_per_class: int, test_per_class: int, corruption: Corruption, seed: int) -> dict:
    """Per class: ``test_per_class`` clean test images, ``meta_per_class`` clean meta images, the rest
    training images, which are then made long-tailed and/or given noisy labels (metaphi.tasks.corrupt),
    all drawn from a generator seeded with ``seed``. Returns float images in [0, 1] and labels:
    {"train": (x, y), "meta": (x, y), "test": (x, y), "noisy": bool [N_train], "train_counts": [...],
    "indices": {"train", "meta", "test"} into ``data``}"""
    from metaphi.tasks import corrupt
    g = torch.Generator().manual_seed(seed)
    labels = data.targets
    c = data.num_classes
    meta_idx, test_idx = corrupt.stratified_split(labels, [meta_per_class, test_per_class], g)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[meta_idx] = False
    rest[test_idx] = False
    train_idx = torch.nonzero(rest).flatten()
    if corruption.imbalance != 1:
        train_idx = train_idx[corrupt.long_tail(labels[train_idx], c, corruption.imbalance, g)]
    clean = labels[train_idx]
    if corruption.noise == "uniform":
        noisy_labels = corrupt.uniform_noise(clean, c, corruption.noise_rate, g)
    elif corruption.noise == "flip":
        noisy_labels = corrupt.flip_noise(clean, c, corruption.noise_rate, g)
    elif corruption.noise == "none":
        noisy_labels = clean
    else:
        raise ValueError(f"noise must be none, uniform or flip, got {corruption.noise!r}")

    def images(idx: Tensor) -> Tensor:
        return data.images[idx].float() / 255.0

    return {"train": (images(train_idx), noisy_labels), "meta": (images(meta_idx), labels[meta_idx]),
            "test": (images(test_idx), labels[test_idx]), "noisy": noisy_labels != clean,
            "train_counts": torch.bincount(clean, minlength=c).tolist(),
            "indices": {"train": train_idx, "meta": meta_idx, "test": test_idx}}


def build_model(spec: dict, num_classes: int, image_shape) -> nn.Module:
    from metaphi.models import MLP, Conv4
    ch, h, w = image_shape
    if spec["name"] == "conv4":
        return Conv4(ch, num_classes, hidden=spec.get("hidden", 32), image_size=h)
    if spec["name"] == "mlp":
        return MLP(ch * h * w, num_classes, tuple(spec.get("hidden", (100,))))
    raise ValueError(f"unknown model {spec['name']!r} (known: mlp, conv4)")


# -- many runs: methods × seeds, with checkpoints, and their summary --------------------------

def run_experiment(data: str = "digits", methods=("plain", "l2rw", "mwnet"), seeds=(0, 1, 2, 3, 4),
                   corruption: Corruption | None = None, model: dict | None = None, cfg: ReweightConfig | None = None,
                   meta_per_class: int = 10, test_per_class: int = 50, classes: int | None = None,
                   data_root: str | None = None, checkpoint: str | None = None, progress: bool = False,
                   log=print) -> dict:
    """Every (seed, method) run, resumed from ``checkpoint`` when it holds the same configuration.

    Within a seed every method sees the same split, corruption and initial weights. Returns
    {"config", "rows", "summary"}; a row holds the seed, the method, the final test accuracy and the
    per-epoch history."""
    from metaphi.tasks.base import atomic_save
    corruption = corruption or Corruption()
    cfg = cfg or ReweightConfig()
    cfg.check()
    model = model or {"name": "mlp", "hidden": [100]}
    config = {"data": data, "methods": list(methods), "seeds": list(seeds), "corruption": corruption.to_dict(),
              "model": model, "train": cfg.to_dict(), "meta_per_class": meta_per_class,
              "test_per_class": test_per_class, "classes": classes}
    rows: list[dict] = []
    if checkpoint:
        import os
        if os.path.exists(checkpoint):
            saved = torch.load(checkpoint, weights_only=False)
            if saved.get("config") != config:
                raise ValueError(f"{checkpoint} holds a different configuration; use another --out or delete it")
            rows = saved["rows"]
            log(f"resuming: {len(rows)} runs done")
    done = {(r["seed"], r["method"]) for r in rows}
    store = load_data(data, data_root, classes)
    plan = [(s, m) for s in seeds for m in methods]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), initial=sum(1 for p in plan if p in done),
                   desc=f"reweight {data} ({corruption.label()})")
    splits: dict[int, dict] = {}
    for seed, method in plan:
        if (seed, method) in done:
            continue
        if seed not in splits:
            splits[seed] = make_splits(store, meta_per_class, test_per_class, corruption, seed)
        split = splits[seed]
        shape = tuple(split["test"][0].shape[1:])
        with torch.random.fork_rng():  # the initial weights come from the seed and touch no global state
            torch.manual_seed(seed)
            net = build_model(model, store.num_classes, shape)
        init = params_of(net, False)
        train_set, noisy = split["train"], split["noisy"]
        if method == "plain-meta":  # the clean meta images used as ordinary training data
            train_set = tuple(torch.cat([a, b]) for a, b in zip(split["train"], split["meta"]))
            noisy = torch.cat([noisy, torch.zeros(len(split["meta"][1]), dtype=torch.bool)])
        t0 = time.perf_counter()
        params, history = train(method, net, init, train_set, split["meta"], cfg,
                                torch.Generator().manual_seed(1000 + seed), noisy=noisy)
        history.pop("mwnet_params", None)
        row = {"seed": seed, "method": method, "test_acc": accuracy(net, params, *split["test"]),
               "train_size": len(train_set[1]), "noisy_fraction": float(noisy.float().mean()),
               "train_counts": split["train_counts"], "wall_s": time.perf_counter() - t0, "history": history}
        rows.append(row)
        if checkpoint:
            atomic_save({"config": config, "rows": rows}, checkpoint)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(seed=seed, method=method, acc=f"{row['test_acc']:.3f}")
    if bar is not None:
        bar.close()
    return {"config": config, "rows": rows, "summary": summarize(rows, methods)}


def summarize(rows: list[dict], methods=METHODS) -> list[dict]:
    out = []
    for method in methods:
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        acc, ci = mean_ci95([r["test_acc"] for r in rs])
        share = [r["history"]["noisy_weight_share"][-1] for r in rs
                 if r["history"]["noisy_weight_share"][-1] is not None]
        entry = {"method": method, "seeds": len(rs), "test_acc": acc, "test_ci95": ci,
                 "wall_s": sum(r["wall_s"] for r in rs) / len(rs)}
        if share and any(r["noisy_fraction"] > 0 for r in rs):
            entry["noisy_weight_share"], entry["noisy_weight_share_ci95"] = mean_ci95(share)
            entry["noisy_fraction"] = sum(r["noisy_fraction"] for r in rs) / len(rs)
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    c = result["config"]
    corr = Corruption(**c["corruption"])
    lines = [f"**{c['data']}, {corr.label()}** ({c['model']['name']} {c['model'].get('hidden')}; per class "
             f"{c['meta_per_class']} clean meta / {c['test_per_class']} test images; {c['train']['epochs']} epochs; "
             f"{len(c['seeds'])} seeds; final test accuracy, mean ± 95% t-interval)", "",
             "| method | test acc % | weight on wrong labels (last epoch) | s per run |", "|---|---|---|---|"]
    for e in result["summary"]:
        share = "—"
        if "noisy_weight_share" in e:
            share = (f"{100 * e['noisy_weight_share']:.1f} ± {100 * e['noisy_weight_share_ci95']:.1f}% "
                     f"(of {100 * e['noisy_fraction']:.1f}% wrong)")
        lines.append(f"| {e['method']} | {100 * e['test_acc']:.2f} ± {100 * e['test_ci95']:.2f} | {share} | "
                     f"{e['wall_s']:.1f} |")
    return "\n".join(lines)
