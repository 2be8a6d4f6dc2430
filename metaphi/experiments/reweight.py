"""The sample-reweighting study: plain training, L2RW and Meta-Weight-Net under label noise or class
imbalance, over seeds (``metaphi reweight``).

One data set is split per class into clean test images, a few clean meta images and training images;
the training images get seeded label noise and/or a long-tailed class profile
(``metaphi.tasks.corrupt``). Each seed trains the same initial network on them with every method:

- "plain": every example of a batch weighs 1/n;
- "plain-meta": the same, with the clean meta images added to the training data (the fair use of
  the labels the reweighting methods see);
- "l2rw", "mwnet": example weights from a one-step lookahead judged on the clean meta images, by
  Learning to Reweight Examples (Ren et al. 2018) or Meta-Weight-Net (Shu et al. 2019); the methods
  and their math are in ``metaphi.algorithms.reweight``.

The classifier θ trains by SGD with momentum (lr ×0.1 at fixed fractions of training) on the
weighted loss Σ_i w_i ℓ_i(θ) with the weights held constant; for MW-Net, V's parameters φ take one
Adam step on ∇_φ L_meta before each of θ's steps (``train``). ``run_experiment`` runs every (seed,
method) pair with a checkpoint after each; ``run`` is the command: a :class:`ReweightConfig` in,
``config.yaml``, ``checkpoint.pt``, ``result.json`` and ``result.md`` out.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
from torch import Tensor, nn

from metaphi.algorithms.reweight import (L2RW_MODES, MetaWeightNet, WeightedLookahead, l2rw_scores, l2rw_weights,
                                         mwnet_weigh, one_task, per_example_losses)
from metaphi.config import UsageError, check, default_of, flag_of, option, to_dict
from metaphi.functional import Params, accuracy, detach, params_of
from metaphi.inner.rules import TorchSGD
from metaphi.tasks.registry import NAMED
from metaphi.tasks.registry import load_named as load_data

METHODS = ("plain", "plain-meta", "l2rw", "mwnet")
MWNET_ESTIMATORS = ("second-order", "first-order", "es")
NOISES = ("none", "uniform", "flip")
MODELS = ("mlp", "conv4")


@dataclass
class TrainConfig:
    """How one network is trained (``train``): the classifier's SGD and the reweighting methods' settings."""

    epochs: int = option(100, "training epochs", check="positive")
    batch: int = option(100, "training images per step", check="positive")
    lr: float = option(0.03, "SGD step size of the classifier, ×0.1 after each fraction of --lr-decay-at",
                       check="positive")
    momentum: float = option(0.9, "SGD momentum", check="nonneg")
    weight_decay: float = option(5e-4, "SGD weight decay", check="nonneg")
    lr_decay_at: list[float] = option(default_factory=lambda: [0.6, 0.8], check="unit",
                                      help="fractions of training after which the lr is multiplied by 0.1")
    lookahead_lr: float | None = option(None, "step size α of the virtual step; none: the current lr")
    meta_batch: int | None = option(None, "clean images per meta step; none: all of them", check="positive")
    l2rw_mode: str = option("jvp", "how L2RW's scores are computed: one forward-mode product (jvp) or through "
                            "the lookahead", choices=L2RW_MODES)
    mwnet_hidden: int = option(100, "hidden units of Meta-Weight-Net", check="positive")
    mwnet_lr: float = option(1e-3, "Adam step size of Meta-Weight-Net", check="positive")
    mwnet_weight_decay: float = option(1e-4, "Adam weight decay of Meta-Weight-Net", check="nonneg")
    mwnet_normalize: bool = option(True, "Meta-Weight-Net's weights sum to one over the batch (the authors' code); "
                                   "--no-mwnet-normalize divides them by the batch size (the paper)")
    mwnet_estimator: str = option("second-order", "how Meta-Weight-Net's meta-gradient is estimated "
                                  "(metaphi.outer)", choices=MWNET_ESTIMATORS)
    es_population: int = option(16, "ES population (--mwnet-estimator es)", check="positive")
    es_sigma: float = option(0.01, "ES perturbation scale (--mwnet-estimator es)", check="positive")


@dataclass
class ReweightConfig(TrainConfig):
    """``metaphi reweight``: the data, its corruption, the network, the methods and seeds, and the training."""

    data: str = option("digits", "digits (built in), glyphs (built in) or omniglot (the small1 minimal split "
                       "under --data-root)", choices=NAMED, positional=True)
    methods: list[str] = option(default_factory=lambda: ["plain", "l2rw", "mwnet"], choices=METHODS,
                                help=f"comma list of {', '.join(METHODS)}")
    noise: str = option("uniform", "label noise on the training split", choices=NOISES)
    noise_rate: float = option(0.4, "probability a label is redrawn (uniform) or flipped (flip)", check="unit")
    imbalance: float = option(1.0, "long-tailed training split: largest/smallest class size (1: balanced)")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2, 3, 4], check="nonneg",
                              help="split, corruption and initialization seeds")
    meta_per_class: int = option(10, "clean meta images per class", check="positive")
    test_per_class: int = option(50, "clean test images per class", check="positive")
    classes: int | None = option(None, "use this many classes, drawn by a fixed seed; none: all")
    model: str = option("mlp", "the classifier", choices=MODELS)
    hidden: list[int] = option(default_factory=lambda: [100], check="positive",
                               help="mlp: comma list of widths; conv4: its channels")
    data_root: str | None = option(None, "folder with the Omniglot archives; none: $METAPHI_DATA or "
                                   "~/.cache/metaphi/data")
    threads: int = option(0, "torch threads; 0: torch's choice", check="nonneg")
    out: str = option("runs/reweight", "folder for config.yaml, checkpoint.pt, result.json, result.md")
    quiet: bool = option(False, "no progress output")


def training(config: TrainConfig) -> TrainConfig:
    """The training part of a config (what a run's checkpoint is matched on)."""
    return TrainConfig(**{f.name: getattr(config, f.name) for f in fields(TrainConfig)})


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    return cfg.lr * 0.1 ** sum(epoch >= round(f * cfg.epochs) for f in cfg.lr_decay_at)


def train(method: str, model: nn.Module, params: Params, train_set: tuple[Tensor, Tensor],
          meta_set: tuple[Tensor, Tensor] | None, cfg: TrainConfig, generator: torch.Generator,
          noisy: Tensor | None = None, mwnet_params: Params | None = None,
          on_epoch: Callable[[int, dict], None] | None = None) -> tuple[Params, dict]:
    """Train ``model`` from ``params`` on ``train_set`` with ``method``'s example weights.

    "plain" (and "plain-meta", whose caller has already merged the meta set into ``train_set``)
    weighs every example 1/n; "l2rw" and "mwnet" weigh by the lookahead on ``meta_set``.
    ``generator`` decides the batch order and the meta batches and nothing else. ``noisy`` (bool [N])
    marks corrupted training labels, for the share of weight they receive. ``mwnet_params``: V's
    initial φ (default: a fresh net from ``generator``). Returns (params, history) where history has
    per-epoch "loss", "lr", "noisy_weight_share", "zero_weight_share" and, for MW-Net, the final φ.

    Each epoch is one run of the online bilevel loop (``metaphi.train_online``) over its batches, one
    step per batch (:func:`online_step`); θ follows ``torch.optim.SGD``'s arithmetic (``TorchSGD``)
    and MW-Net's φ ``torch.optim.Adam``'s (``TorchAdam``). ``on_epoch(epoch, {"params", **the epoch's
    history})`` after each epoch.
    """
    from metaphi import train_online
    from metaphi.inner.rules import TorchAdam

    check(cfg)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in ("l2rw", "mwnet") and meta_set is None:
        raise ValueError(f"{method} needs a clean meta set")
    x, y = train_set
    theta = detach(params)
    state = {"theta": theta, "theta_opt": TorchSGD(cfg.lr, cfg.momentum, cfg.weight_decay).init(theta),
             "phi": None, "phi_opt": None}
    vnet = estimator = None
    if method == "mwnet":
        from metaphi.outer import build_estimator
        vnet = MetaWeightNet(cfg.mwnet_hidden)
        if mwnet_params is None:
            with torch.random.fork_rng():  # V's initial weights come from the run's generator alone
                torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
                vnet = MetaWeightNet(cfg.mwnet_hidden)
            mwnet_params = params_of(vnet)
        phi = {k: v.detach().clone().to(x.dtype) for k, v in mwnet_params.items()}
        state["phi"], state["phi_opt"] = phi, TorchAdam(cfg.mwnet_lr, weight_decay=cfg.mwnet_weight_decay).init(phi)
        options = {"loop": True}  # one task: no batch of tasks to vectorize over
        if cfg.mwnet_estimator == "es":
            options = {"population": cfg.es_population, "sigma": cfg.es_sigma,
                       "estimator_seed": int(torch.randint(2 ** 62, (1,), generator=generator))}
        estimator = build_estimator(cfg.mwnet_estimator, options)
    history: dict = {"loss": [], "lr": [], "noisy_weight_share": [], "zero_weight_share": [], "meta_loss": []}
    for epoch in range(cfg.epochs):
        lr = lr_at(cfg, epoch)
        order = torch.randperm(len(y), generator=generator)
        step = online_step(method, model, train_set, meta_set, cfg, epoch, order, vnet, estimator, noisy)
        record = train_online.run(step, state, -(-len(y) // cfg.batch), generator=generator, hint="lower --lr")
        state, steps = record["state"], record["step"]
        sums = {"loss": 0.0, "noisy": 0.0, "zero": 0.0, "meta": 0.0}
        for metrics in record["history"]:  # in order from 0.0, as the running sums of one loop would be
            for k in sums:
                sums[k] += metrics[k] or 0.0
        history["loss"].append(sums["loss"] / steps)
        history["lr"].append(lr)
        history["noisy_weight_share"].append(sums["noisy"] / steps if noisy is not None else None)
        history["zero_weight_share"].append(sums["zero"] / steps)
        history["meta_loss"].append(sums["meta"] / steps if method == "mwnet" else None)
        if on_epoch is not None:
            on_epoch(epoch, {"params": state["theta"], **{k: v[-1] for k, v in history.items()}})
    if state["phi"] is not None:
        history["mwnet_params"] = state["phi"]
    return state["theta"], history


def online_step(method: str, model: nn.Module, train_set: tuple[Tensor, Tensor],
                meta_set: tuple[Tensor, Tensor] | None, cfg: TrainConfig, epoch: int, order: Tensor,
                vnet: MetaWeightNet | None = None, estimator=None, noisy: Tensor | None = None):
    """The step of ``metaphi.train_online.run`` for epoch ``epoch`` (from 0), whose batch order is ``order``.

    Step t takes the t-th batch, draws a meta batch from the generator (when ``cfg.meta_batch`` is
    smaller than the meta set), weighs the batch (MW-Net: after φ's Adam step on ∇_φ L_meta), and takes
    θ's SGD step on the weighted loss. State {"theta", "theta_opt", "phi", "phi_opt"} in, a new one out;
    metrics: the weighted loss, the share of weight on ``noisy`` labels (0 when the batch has no
    weight, None without ``noisy``), the share of zero weights, and MW-Net's meta loss."""
    from metaphi.inner.rules import TorchAdam

    x, y = train_set
    lr = lr_at(cfg, epoch)
    alpha = cfg.lookahead_lr or lr
    theta_rule = TorchSGD(lr, cfg.momentum, cfg.weight_decay)
    phi_rule = TorchAdam(cfg.mwnet_lr, weight_decay=cfg.mwnet_weight_decay)

    def step(state: dict, t: int, generator: torch.Generator) -> tuple[dict, dict]:
        idx = order[t * cfg.batch:(t + 1) * cfg.batch]
        bx, by = x[idx], y[idx]
        meta = None
        if meta_set is not None and method in ("l2rw", "mwnet"):
            meta = meta_set
            if cfg.meta_batch is not None and cfg.meta_batch < len(meta_set[1]):
                pick = torch.randperm(len(meta_set[1]), generator=generator)[:cfg.meta_batch]
                meta = (meta_set[0][pick], meta_set[1][pick])
        phi, phi_opt, meta_loss = state["phi"], state["phi_opt"], None
        if method == "l2rw":
            w = l2rw_weights(l2rw_scores(model, state["theta"], (bx, by), meta, alpha, cfg.l2rw_mode))
        elif method == "mwnet":
            algo = WeightedLookahead(model, state["theta"], alpha, mwnet_weigh(vnet, cfg.mwnet_normalize))
            grads, metrics = estimator(algo, {k: v.detach().requires_grad_(True) for k, v in phi.items()},
                                       one_task((bx, by), meta))
            phi, phi_opt = phi_rule.update(phi, grads, phi_opt, {})
            meta_loss = metrics["loss"]
            with torch.no_grad():
                w = algo.weights(phi, bx, by)
        else:
            w = torch.full((len(idx),), 1.0 / len(idx), dtype=x.dtype)
        w = w.detach()
        theta = {k: v.detach().requires_grad_(True) for k, v in state["theta"].items()}
        loss = (w * per_example_losses(model, theta, bx, by)).sum()
        grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
        theta, theta_opt = theta_rule.update(state["theta"], grads, state["theta_opt"], {})
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{method}: the training loss became {float(loss)} in epoch "
                                     f"{epoch + 1}; lower --lr")
        total = float(w.sum())
        share = None
        if noisy is not None:
            share = float(w[noisy[idx]].sum()) / total if total > 0 else 0.0
        return ({"theta": theta, "theta_opt": theta_opt, "phi": phi, "phi_opt": phi_opt},
                {"loss": float(loss.detach()), "noisy": share, "zero": float((w <= 0).float().mean()),
                 "meta": meta_loss})

    return step


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
                   corruption: Corruption | None = None, model: dict | None = None, cfg: TrainConfig | None = None,
                   meta_per_class: int = 10, test_per_class: int = 50, classes: int | None = None,
                   data_root: str | None = None, checkpoint: str | None = None, progress: bool = False,
                   log=print) -> dict:
    """Every (seed, method) run, resumed from ``checkpoint`` when it holds the same configuration.

    Within a seed every method sees the same split, corruption and initial weights. Returns
    {"config", "rows", "summary"}; a row holds the seed, the method, the final test accuracy and the
    per-epoch history. The checkpoint is plain data (``metaphi.checkpoint``), rewritten after each run."""
    from metaphi.experiments.report import sweep
    corruption = corruption or Corruption()
    cfg = training(cfg or TrainConfig())
    check(cfg)
    model = model or {"name": "mlp", "hidden": [100]}
    config = {"data": data, "methods": list(methods), "seeds": list(seeds), "corruption": corruption.to_dict(),
              "model": model, "train": to_dict(cfg), "meta_per_class": meta_per_class,
              "test_per_class": test_per_class, "classes": classes}
    store = load_data(data, data_root, classes)
    splits: dict[int, dict] = {}

    def run_cell(cell: tuple[int, str]) -> dict:
        seed, method = cell
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
        return {"seed": seed, "method": method, "test_acc": accuracy(net, params, *split["test"]),
                "train_size": len(train_set[1]), "noisy_fraction": float(noisy.float().mean()),
                "train_counts": split["train_counts"], "wall_s": time.perf_counter() - t0, "history": history}

    rows = sweep([(s, m) for s in seeds for m in methods], run_cell, key=lambda r: (r["seed"], r["method"]),
                 checkpoint=checkpoint, identity=config, desc=f"reweight {data} ({corruption.label()})",
                 progress=progress, log=log,
                 postfix=lambda r: {"seed": r["seed"], "method": r["method"], "acc": f"{r['test_acc']:.3f}"})
    return {"config": config, "rows": rows, "summary": summarize(rows, methods)}


def summarize(rows: list[dict], methods=METHODS) -> list[dict]:
    """Per method: test accuracy (mean, 95% t-interval), seconds per run and, under label noise, the share
    of the last epoch's batch weight on wrong labels (mean, 95% t-interval) beside the share of wrong labels."""
    from metaphi.experiments.report import over_seeds
    flat = [{"method": r["method"], "test_acc": r["test_acc"], "wall_s": r["wall_s"],
             "share": r["history"]["noisy_weight_share"][-1], "noisy_fraction": r["noisy_fraction"]}
            for r in rows if r["method"] in methods]
    out = []
    for e in over_seeds(flat, ("method",), ("test_acc", "wall_s", "share", "noisy_fraction"), order=list(methods)):
        entry = {"method": e["method"], "seeds": e["seeds"], "test_acc": e["test_acc"], "test_ci95": e["test_acc_ci"],
                 "wall_s": e["wall_s"]}
        if "share" in e and e["noisy_fraction"] > 0:
            entry["noisy_weight_share"], entry["noisy_weight_share_ci95"] = e["share"], e["share_ci"]
            entry["noisy_fraction"] = e["noisy_fraction"]
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    from metaphi.experiments.report import markdown_table, pm
    c = result["config"]
    corr = Corruption(**c["corruption"])
    rows = []
    for e in result["summary"]:
        share = "—"
        if "noisy_weight_share" in e:
            share = (f"{pm(e['noisy_weight_share'], e['noisy_weight_share_ci95'], digits=1)}% "
                     f"(of {100 * e['noisy_fraction']:.1f}% wrong)")
        rows.append([e["method"], pm(e["test_acc"], e["test_ci95"]), share, f"{e['wall_s']:.1f}"])
    return (f"**{c['data']}, {corr.label()}** ({c['model']['name']} {c['model'].get('hidden')}; per class "
            f"{c['meta_per_class']} clean meta / {c['test_per_class']} test images; {c['train']['epochs']} epochs; "
            f"{len(c['seeds'])} seeds; final test accuracy, mean ± 95% t-interval)\n\n"
            + markdown_table(["method", "test acc %", "weight on wrong labels (last epoch)", "s per run"], rows))


# -- the command: a config in, result files out ------------------------------------------------

#: options that only act in some studies: the option -> (whether it acts in ``config``, what it needs)
APPLIES: dict[str, tuple[Callable[[ReweightConfig], bool], str]] = {
    "l2rw_mode": (lambda c: "l2rw" in c.methods, "--methods with l2rw"),
    **{name: (lambda c: "mwnet" in c.methods, "--methods with mwnet")
       for name in ("mwnet_hidden", "mwnet_lr", "mwnet_weight_decay", "mwnet_normalize", "mwnet_estimator")},
    **{name: (lambda c: "mwnet" in c.methods and c.mwnet_estimator == "es", "--methods with mwnet and "
              "--mwnet-estimator es") for name in ("es_population", "es_sigma")},
    **{name: (lambda c: bool({"l2rw", "mwnet"} & set(c.methods)), "--methods with l2rw or mwnet")
       for name in ("lookahead_lr", "meta_batch")},
    "noise_rate": (lambda c: c.noise != "none" or c.noise_rate == 0, "--noise uniform or flip"),
    "data_root": (lambda c: c.data == "omniglot", "the omniglot data set"),
}


def validate(config: ReweightConfig) -> None:
    """What the declared checks cannot see; a UsageError naming the option."""
    check(config)
    if not config.methods:
        raise UsageError(f"--methods: give at least one of {', '.join(METHODS)}")
    if not config.seeds:
        raise UsageError("--seeds: give at least one seed")
    if config.noise != "none" and config.noise_rate == 0:
        raise UsageError(f"--noise {config.noise} needs a --noise-rate above 0 (e.g. 0.4)")
    if config.imbalance < 1:
        raise UsageError(f"--imbalance is largest/smallest class size and must be >= 1, got {config.imbalance}")
    if config.model == "conv4" and len(config.hidden) != 1:
        raise UsageError("--hidden for conv4 is one number: the channels of every layer")
    if "mwnet" in config.methods and config.mwnet_estimator == "es" and config.es_population % 2:
        raise UsageError(f"--es-population must be an even number (antithetic pairs), got {config.es_population}")
    byname = {f.name: f for f in fields(ReweightConfig)}
    for name, (acts, needs) in APPLIES.items():
        if getattr(config, name) != default_of(byname[name]) and not acts(config):
            raise UsageError(f"{flag_of(byname[name])} applies only with {needs}")


def corruption_of(config: ReweightConfig) -> Corruption:
    return Corruption(config.noise, config.noise_rate if config.noise != "none" else 0.0, config.imbalance)


def model_of(config: ReweightConfig) -> dict:
    return {"name": config.model, "hidden": list(config.hidden) if config.model == "mlp" else config.hidden[0]}


def run(config: ReweightConfig) -> dict:
    """The study of ``config``: its config.yaml, every (seed, method) run resumed from checkpoint.pt in
    ``config.out``, and result.json / result.md. Bad input raises a UsageError."""
    from metaphi.config import writable_dir
    from metaphi.experiments.report import save_config, write_result
    validate(config)
    out = writable_dir(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    save_config(config, out, "reweight")
    log = (lambda *a: None) if config.quiet else print
    t0 = time.perf_counter()
    result = run_experiment(config.data, config.methods, config.seeds, corruption_of(config), model_of(config),
                            training(config), config.meta_per_class, config.test_per_class, config.classes,
                            config.data_root, os.path.join(out, "checkpoint.pt"), not config.quiet, log)
    result["wall_s"] = time.perf_counter() - t0
    write_result(result, out, markdown(result), config.quiet, also=", config.yaml and checkpoint.pt")
    return result


def main(config: ReweightConfig) -> int:
    """``metaphi reweight``: :func:`run`, with a failure the user can fix as one line (exit code 2)."""
    from metaphi.tasks import DataError
    try:
        run(config)
    except (ValueError, FileNotFoundError, DataError) as e:
        raise UsageError(str(e)) from e
    except FloatingPointError as e:
        raise UsageError(f"{e} (the finished runs are kept in {os.path.join(config.out, 'checkpoint.pt')})") from e
    return 0
