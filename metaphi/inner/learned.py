"""Learned update rules: from a learned step size per layer up to a learned optimizer network.

The ladder, each rung a rule in the form of ``rules.py`` (``meta_params``, ``init``, ``update``,
``spec``) so that it runs in any inner loop (``adapt``), in the learned-optimizer trainer
(``metaphi.experiments.l2o``) and, once meta-trained, as a ``torch.optim`` optimizer (``metaphi.inner.optim``):

* ``PerLayerSGD``     θ_k ← θ_k − α_k ∇_k              one learned step size per parameter tensor
* ``ScheduledSGD``    θ ← θ − α_t ∇                     a learned step size for every inner step t
                                                        (one schedule for all tensors, or one per
                                                        tensor as in MAML++'s per-layer per-step rates)
* ``LSTMRule``        θ ← θ + m_φ(∇, h)                 a coordinatewise two-layer LSTM
* ``MLPRule``         θ ← θ − s·(w·x + net_φ(x))        a coordinatewise MLP of momentum features

``LSTMRule`` is the learned optimizer of Andrychowicz et al. 2016, "Learning to learn by gradient
descent by gradient descent": one small LSTM (two layers of 20 units) is applied to every coordinate
of every parameter separately, with its own hidden state per coordinate and shared weights, so the
same optimizer runs on models of any size. Gradients are preprocessed (their Appendix A) into a
log-magnitude and a sign, so that inputs spanning many orders of magnitude are on one scale:

    ∇ ↦ (log|∇| / p, sign ∇)   if |∇| ≥ e^{−p}
        (−1, e^{p} ∇)           otherwise,            p = 10,

and the LSTM's output, times 0.1, is the update. ``sgd_lr`` adds a learned term −a·∇ with a = sgd_lr
and zeroes the LSTM's output layer, so that the untrained rule is exactly SGD and meta-training starts
from it.

``MLPRule`` is the feed-forward alternative (in the spirit of Metz et al. 2019/2020): the per-
coordinate features are the preprocessed gradient, the gradient and its running averages at decay
rates 0.5, 0.9 and 0.99, each divided by the root of a running average of its square (Adam's
normalised momentum, with bias correction), and the log of that root. Its update is
−exp(log_scale)·(w·x + net(x)); with ``init="adam"`` the untrained rule is Adam (w picks the
0.9-momentum feature, net's output layer is zero), so meta-training improves on a known optimizer
instead of starting from noise; ``init="sgd"`` adds a learned −a·∇ term and starts as SGD.

Rules whose meta-parameters are shared by all coordinates (``shared = True``) carry a state per
parameter tensor, ``{name: {field: Tensor}}``, which is what lets ``LearnedOptimizer`` keep it in
``torch.optim``'s per-parameter state.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from metaphi.functional import Params

PREPROCESS_P = 10.0
CHUNK = 4096


def preprocess_gradient(grad: Tensor, p: float = PREPROCESS_P) -> Tensor:
    """The two input features per coordinate of Andrychowicz et al. 2016, Appendix A: [..., 2]."""
    threshold = math.exp(-p)
    big = grad.abs() >= threshold
    # clamp keeps log finite on the branch not taken, so its gradient is not NaN either
    magnitude = torch.where(big, grad.abs().clamp_min(threshold).log() / p, -torch.ones_like(grad))
    sign = torch.where(big, torch.sign(grad), math.exp(p) * grad)
    return torch.stack([magnitude, sign], -1)


def _uniform(shape, bound: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).to(torch.get_default_dtype())


class PerLayerSGD:
    """θ_k ← θ_k − α_k ∇_k: one learned step size per parameter tensor (layer), initialised to ``lr``."""

    shared = False

    def __init__(self, lr: float):
        self.lr = float(lr)

    def meta_params(self, params: Params) -> Params:
        return {k: torch.full((), self.lr, dtype=p.dtype, device=p.device) for k, p in params.items()}

    def init(self, params: Params) -> None:
        return None

    def update(self, params: Params, grads: Params, state: None, meta: Params) -> tuple[Params, None]:
        return {k: p - meta[k] * grads[k] for k, p in params.items()}, None

    def spec(self) -> dict:
        return {"name": "per-layer-sgd", "lr": self.lr}


class ScheduledSGD:
    """θ ← θ − α_t ∇ with a learned step size for each of the first ``steps`` steps (then α_{steps−1}).

    ``per_layer=False``: one schedule ``schedule`` shared by every tensor (usable on any model);
    ``per_layer=True``: a schedule per tensor, keyed by the tensor's name.
    """

    def __init__(self, lr: float, steps: int, per_layer: bool = False):
        if steps < 1:
            raise ValueError("a schedule needs steps >= 1")
        self.lr, self.steps, self.per_layer = float(lr), int(steps), bool(per_layer)
        self.shared = not self.per_layer

    def meta_params(self, params: Params) -> Params:
        ref = next(iter(params.values()))
        full = torch.full((self.steps,), self.lr, dtype=ref.dtype, device=ref.device)
        if self.per_layer:
            return {k: full.clone() for k in params}
        return {"schedule": full}

    def init(self, params: Params) -> dict:
        return {k: {"step": torch.zeros((), dtype=torch.long, device=p.device)} for k, p in params.items()}

    def update(self, params: Params, grads: Params, state: dict, meta: Params) -> tuple[Params, dict]:
        new_params, new_state = {}, {}
        for k, p in params.items():
            schedule = meta[k] if self.per_layer else meta["schedule"]
            step = state[k]["step"]
            lr = schedule.index_select(0, step.clamp(max=self.steps - 1).view(1)).squeeze(0)
            new_params[k] = p - lr * grads[k]
            new_state[k] = {"step": step + 1}
        return new_params, new_state

    def spec(self) -> dict:
        return {"name": "schedule-sgd", "lr": self.lr, "steps": self.steps, "per_layer": self.per_layer}


class LSTMRule:
    """The coordinatewise LSTM optimizer of Andrychowicz et al. 2016 (see the module docstring).

    Meta-parameters: ``lstm.{i}.weight`` [4H, in+H] and ``lstm.{i}.bias`` [4H] per layer (gates in
    the order input, forget, cell, output, as in ``nn.LSTM``), ``lstm.out.weight`` [1, H],
    ``lstm.out.bias`` [1], and ``lstm.sgd`` (the −a·∇ term) when ``sgd_lr`` is given.
    Weights start uniform in ±1/√H as in ``nn.LSTM``, drawn from a generator seeded with ``seed``.
    """

    shared = True

    def __init__(self, hidden: int = 20, layers: int = 2, output_scale: float = 0.1, preprocess_p: float = PREPROCESS_P,
                 sgd_lr: float | None = None, seed: int = 0):
        self.hidden, self.layers = int(hidden), int(layers)
        self.output_scale, self.preprocess_p = float(output_scale), float(preprocess_p)
        self.sgd_lr = None if sgd_lr is None else float(sgd_lr)
        self.seed = int(seed)

    def meta_params(self, params: Params | None = None) -> Params:
        g = torch.Generator().manual_seed(self.seed)
        h = self.hidden
        bound = 1 / math.sqrt(h)
        meta = {}
        width = 2
        for i in range(self.layers):
            meta[f"lstm.{i}.weight"] = _uniform((4 * h, width + h), bound, g)
            meta[f"lstm.{i}.bias"] = _uniform((4 * h,), bound, g)
            width = h
        meta["lstm.out.weight"] = _uniform((1, h), bound, g)
        meta["lstm.out.bias"] = _uniform((1,), bound, g)
        if self.sgd_lr is not None:
            meta["lstm.out.weight"].zero_()
            meta["lstm.out.bias"].zero_()
            meta["lstm.sgd"] = torch.tensor(self.sgd_lr, dtype=torch.get_default_dtype())
        return meta

    def init(self, params: Params) -> dict:
        return {k: {"h": p.new_zeros(p.numel(), self.layers, self.hidden),
                    "c": p.new_zeros(p.numel(), self.layers, self.hidden)} for k, p in params.items()}

    def _step(self, grad: Tensor, h: Tensor, c: Tensor, meta: Params) -> tuple[Tensor, Tensor, Tensor]:
        """The update [n] and new states [n, layers, H] of n coordinates with gradients ``grad`` [n]."""
        x = preprocess_gradient(grad, self.preprocess_p)
        hs, cs = [], []
        for i in range(self.layers):
            gates = torch.cat([x, h[:, i]], -1) @ meta[f"lstm.{i}.weight"].T + meta[f"lstm.{i}.bias"]
            gi, gf, gg, go = gates.chunk(4, -1)
            c_i = torch.sigmoid(gf) * c[:, i] + torch.sigmoid(gi) * torch.tanh(gg)
            x = torch.sigmoid(go) * torch.tanh(c_i)
            hs.append(x)
            cs.append(c_i)
        out = (x @ meta["lstm.out.weight"].T + meta["lstm.out.bias"]).squeeze(-1)
        return self.output_scale * out, torch.stack(hs, 1), torch.stack(cs, 1)

    def update(self, params: Params, grads: Params, state: dict, meta: Params) -> tuple[Params, dict]:
        new_params, new_state = {}, {}
        for k, p in params.items():
            grad, h, c = grads[k].reshape(-1), state[k]["h"], state[k]["c"]
            if grad.numel() <= CHUNK:
                delta, h, c = self._step(grad, h, c, meta)
            else:  # slices that stay in cache: about twice as fast on large tensors
                parts = [self._step(grad[s:s + CHUNK], h[s:s + CHUNK], c[s:s + CHUNK], meta)
                         for s in range(0, grad.numel(), CHUNK)]
                delta, h, c = (torch.cat(t) for t in zip(*parts))
            delta = delta.reshape(p.shape)
            if self.sgd_lr is not None:
                delta = delta - meta["lstm.sgd"] * grads[k]
            new_params[k] = p + delta
            new_state[k] = {"h": h, "c": c}
        return new_params, new_state

    def spec(self) -> dict:
        return {"name": "lstm", "hidden": self.hidden, "layers": self.layers, "output_scale": self.output_scale,
                "preprocess_p": self.preprocess_p, "sgd_lr": self.sgd_lr, "seed": self.seed}


MOMENTUM_DECAYS = (0.5, 0.9, 0.99)
SQUARE_DECAY = 0.999
EPS = 1e-8
MLP_FEATURES = ("log|g|", "sign g", "g/√v", "m0.5/√v", "m0.9/√v", "m0.99/√v", "log √v")


class MLPRule:
    """A coordinatewise MLP over momentum features (see the module docstring).

    Meta-parameters: ``mlp.skip`` [F] (a linear map of the features), ``mlp.net.{i}.weight`` /
    ``.bias`` (tanh hidden layers, then a zero-initialised output layer), ``mlp.log_scale``, and
    ``mlp.sgd`` with ``init="sgd"``. ``init`` is "adam" (the untrained rule is Adam with step ``lr``),
    "sgd" (plain SGD with step ``lr``) or "random" (no skip; the output layer is random too).
    """

    shared = True

    def __init__(self, hidden: tuple[int, ...] | list[int] = (32, 32), lr: float = 1e-3, init: str = "adam",
                 seed: int = 0):
        if init not in ("adam", "sgd", "random"):
            raise ValueError(f"init must be 'adam', 'sgd' or 'random', got '{init}'")
        self.hidden, self.lr, self.init_as, self.seed = [int(h) for h in hidden], float(lr), init, int(seed)

    def meta_params(self, params: Params | None = None) -> Params:
        g = torch.Generator().manual_seed(self.seed)
        dtype = torch.get_default_dtype()
        features = len(MLP_FEATURES)
        meta = {"mlp.skip": torch.zeros(features, dtype=dtype)}
        width = features
        for i, h in enumerate(self.hidden + [1]):
            bound = 1 / math.sqrt(width)
            meta[f"mlp.net.{i}.weight"] = _uniform((h, width), bound, g)
            meta[f"mlp.net.{i}.bias"] = _uniform((h,), bound, g)
            width = h
        last = len(self.hidden)
        if self.init_as != "random":
            meta[f"mlp.net.{last}.weight"].zero_()
            meta[f"mlp.net.{last}.bias"].zero_()
        if self.init_as == "sgd":
            meta["mlp.log_scale"] = torch.tensor(math.log(1e-3), dtype=dtype)
            meta["mlp.sgd"] = torch.tensor(self.lr, dtype=dtype)
        else:
            meta["mlp.log_scale"] = torch.tensor(math.log(self.lr), dtype=dtype)
        if self.init_as == "adam":
            meta["mlp.skip"][MLP_FEATURES.index("m0.9/√v")] = 1.0
        return meta

    def init(self, params: Params) -> dict:
        out = {}
        for k, p in params.items():
            out[k] = {f"m{i}": torch.zeros_like(p) for i in range(len(MOMENTUM_DECAYS))}
            out[k]["v"] = torch.zeros_like(p)
            out[k]["step"] = torch.zeros((), dtype=p.dtype, device=p.device)
        return out

    def features(self, grad: Tensor, st: dict) -> tuple[Tensor, dict]:
        """Features [..., F] of one tensor's coordinates and the new state."""
        step = st["step"] + 1
        v = SQUARE_DECAY * st["v"] + (1 - SQUARE_DECAY) * grad * grad
        v_hat = v / (1 - SQUARE_DECAY ** step)
        # √0 has an infinite derivative: where a gradient is exactly 0, its root is a constant 0
        root = torch.where(v_hat > 0, torch.where(v_hat > 0, v_hat, 1.0).sqrt(), 0.0) + EPS
        new = {"v": v, "step": step}
        cols = [preprocess_gradient(grad), (grad / root).unsqueeze(-1)]
        for i, beta in enumerate(MOMENTUM_DECAYS):
            m = beta * st[f"m{i}"] + (1 - beta) * grad
            new[f"m{i}"] = m
            cols.append((m / (1 - beta ** step) / root).unsqueeze(-1))
        cols.append((root.log() / PREPROCESS_P).unsqueeze(-1))
        return torch.cat(cols, -1), new

    def update(self, params: Params, grads: Params, state: dict, meta: Params) -> tuple[Params, dict]:
        new_params, new_state = {}, {}
        layers = len(self.hidden) + 1
        for k, p in params.items():
            x, new_state[k] = self.features(grads[k], state[k])
            direction = x @ meta["mlp.skip"]
            h = x
            for i in range(layers):
                h = h @ meta[f"mlp.net.{i}.weight"].T + meta[f"mlp.net.{i}.bias"]
                if i < layers - 1:
                    h = torch.tanh(h)
            direction = direction + h.squeeze(-1)
            new_params[k] = p - meta["mlp.log_scale"].exp() * direction
            if "mlp.sgd" in meta:
                new_params[k] = new_params[k] - meta["mlp.sgd"] * grads[k]
        return new_params, new_state

    def spec(self) -> dict:
        return {"name": "mlp-rule", "hidden": list(self.hidden), "lr": self.lr, "init": self.init_as, "seed": self.seed}


RULES = {"per-layer-sgd": PerLayerSGD, "schedule-sgd": ScheduledSGD, "lstm": LSTMRule, "mlp-rule": MLPRule}


#: the learned rules by their command-line names (``metaphi l2o train --rule``)
RULE_NAMES = ("lstm", "mlp-rule", "per-layer-sgd", "schedule-sgd")


def make_rule(name: str, lr: float | None = None, horizon: int = 100, seed: int = 0):
    """A fresh rule by its name in ``RULE_NAMES``. ``lr``: the starting step size of per-layer-sgd and
    schedule-sgd (default 0.1) and of mlp-rule (Adam's, default 0.01); ``horizon``: schedule-sgd's
    number of steps; ``seed``: the initial weights of the lstm and mlp-rule networks."""
    if name == "lstm":
        return LSTMRule(seed=seed)
    if name == "mlp-rule":
        return MLPRule(lr=0.01 if lr is None else lr, seed=seed)
    if name == "per-layer-sgd":
        return PerLayerSGD(0.1 if lr is None else lr)
    if name == "schedule-sgd":
        return ScheduledSGD(0.1 if lr is None else lr, steps=horizon)
    raise ValueError(f"unknown learned rule '{name}' (valid: {', '.join(RULE_NAMES)})")
