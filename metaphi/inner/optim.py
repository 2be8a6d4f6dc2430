"""A meta-trained update rule as an ordinary ``torch.optim.Optimizer``.

    from metaphi.inner.optim import LearnedOptimizer
    opt = LearnedOptimizer(model.parameters(), "runs/l2o-lstm/optimizer.pt")
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

A learned optimizer file holds the rule's ``spec()`` and its meta-parameters (``save_learned``
writes one; ``metaphi l2o train`` writes ``optimizer.pt``). Rules whose meta-parameters are shared by
all coordinates (the LSTM and MLP rules, a global step-size schedule) run on any model. Rules with a
meta-parameter per tensor (per-layer step sizes) are tied to the tensor names they were trained on:
pass ``model.named_parameters()`` with the same names.

The rule's per-coordinate state (LSTM hidden states, momenta) lives in ``self.state[p]`` like any
optimizer's, so ``state_dict()`` / ``load_state_dict()`` save and restore a run mid-way; the state
dict also carries the rule and its meta-parameters, so it restores the optimizer whole.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from metaphi.functional import Params

FILE_FORMAT = "metaphi-learned-optimizer-1"


def save_learned(path: str | os.PathLike, rule, meta: Params, info: dict | None = None) -> None:
    """Write a learned optimizer file: the rule's spec, its meta-parameters and ``info``, all plain data
    (``metaphi.checkpoint``), so that reading it back runs no code from the file."""
    from metaphi import checkpoint

    checkpoint.save({"format": FILE_FORMAT, "rule": rule.spec(),
                     "meta": {k: v.detach().cpu().clone() for k, v in meta.items()}, "info": info or {}}, path)


def load_learned(source: str | os.PathLike | dict) -> tuple[Any, Params, dict]:
    """(rule, meta-parameters, info) from a learned optimizer file or the dict it holds. The file is read
    as plain data (``metaphi.checkpoint.load``): one holding anything else is refused, never unpickled."""
    from metaphi import checkpoint
    from metaphi.inner import build_rule

    obj = source
    if not isinstance(source, dict):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no learned optimizer file at {source}")
        obj = checkpoint.load(source)
    if not isinstance(obj, dict) or obj.get("format") != FILE_FORMAT:
        raise ValueError(f"{source if not isinstance(source, dict) else 'the dict'} is not a learned optimizer "
                         f"({FILE_FORMAT}); write one with metaphi.inner.optim.save_learned or `metaphi l2o train`")
    return build_rule(obj["rule"]), {k: v.detach().clone() for k, v in obj["meta"].items()}, obj.get("info", {})


class LearnedOptimizer(torch.optim.Optimizer):
    """``torch.optim`` front end of a learned update rule.

    ``params``: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``) or param groups.
    ``learned``: a learned optimizer file, the dict it holds, or a ``(rule, meta)`` pair.
    ``lr`` scales each learned step (θ ← θ + lr·(rule(θ) − θ)): at 1, the default, the step is the
    rule's own; it is a param-group ``"lr"``, so torch's learning-rate schedulers drive it.
    """

    def __init__(self, params, learned: str | os.PathLike | dict | tuple, lr: float = 1.0):
        if not (lr >= 0.0 and lr == lr and lr != float("inf")):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if isinstance(learned, tuple):
            rule, meta = learned
            meta = {k: v.detach().clone() for k, v in meta.items()}
        else:
            rule, meta, _ = load_learned(learned)
        self.rule, self.meta = rule, meta
        super().__init__(params, {"lr": float(lr)})
        if not self._shared:
            for group in self.param_groups:
                names = group.get("param_names")
                if names is None:
                    raise ValueError(f"the rule '{rule.spec()['name']}' learns a meta-parameter per tensor: pass "
                                     f"named parameters (model.named_parameters()) whose names it was trained on")
                missing = [n for n in names if n not in self.meta]
                if missing:
                    raise ValueError(f"the rule '{rule.spec()['name']}' has no meta-parameters for {missing}; it was "
                                     f"trained on tensors named {sorted(self.meta)}")

    @property
    def _shared(self) -> bool:
        return bool(getattr(self.rule, "shared", False))

    def _meta_like(self, p: Tensor) -> Params:
        return {k: v.to(device=p.device, dtype=p.dtype if v.is_floating_point() else v.dtype) for k, v in self.meta.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                key = names[i] if (names is not None and not self._shared) else "param"
                state = self.state[p]
                if not state:
                    fresh = self.rule.init({key: p})  # None for rules without state, called again each step
                    if fresh is not None:
                        state.update(fresh[key])
                rule_state = {key: dict(state)} if state else None
                new_params, new_state = self.rule.update({key: p}, {key: p.grad}, rule_state, self._meta_like(p))
                if group["lr"] == 1.0:
                    p.copy_(new_params[key])  # the rule's own step, bit for bit
                else:
                    p.add_(new_params[key] - p, alpha=group["lr"])
                if new_state is not None:
                    state.update(new_state[key])
        return loss

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["learned"] = {"format": FILE_FORMAT, "rule": self.rule.spec(),
                         "meta": {k: v.clone() for k, v in self.meta.items()}}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        learned = state_dict.pop("learned", None)
        if learned is not None:
            self.rule, self.meta, _ = load_learned(learned)
        super().load_state_dict(state_dict)
