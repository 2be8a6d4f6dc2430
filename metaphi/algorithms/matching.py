"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016, "Matching Networks
for One Shot Learning").

The prediction for a query x̂ is an attention-weighted vote of the support labels,

    P(y = k | x̂, S) = Σ_i a(x̂, x_i) [y_i = k],     a(x̂, x_i) = softmax_i( cos(f(x̂, S), g(x_i, S)) )

so the attention over the support examples sums to one and so do the class probabilities. The loss
is the query negative log-likelihood. Without full-context embeddings f = g = the embedding network.

Full-context embeddings (FCE, the paper's appendix) let each embedding depend on the whole support
set. The support embeddings pass through a bidirectional LSTM,

    g(x_i, S) = h→_i + h←_i + g'(x_i)

and each query is refined by K steps of an LSTM that attends over g(S):

    ĥ_k, c_k = LSTM(f'(x̂), [h_{k−1}, r_{k−1}], c_{k−1}),   h_k = ĥ_k + f'(x̂)
    r_{k−1}  = Σ_i softmax_i(h_{k−1}ᵀ g(x_i)) g(x_i),       f(x̂, S) = h_K

with h_0 = c_0 = 0. The recurrent input [h, r] is the concatenation the paper writes, so the cell's
recurrent weights are 4d × 2d. The LSTMs are written out in tensor operations on φ so that they run
under ``torch.func.vmap``; the bidirectional LSTM reads the support set in the order given.

The paper's softmax is over raw cosine similarities, which are bounded by 1: with 5 classes the
largest possible probability is about 0.65. ``attention_scale`` multiplies the similarities (1 = the paper).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metaphi.config import UsageError, option
from metaphi.functional import Params, prefixed, with_prefix
from metaphi.algorithms.base import CLASSIFICATION, Problem
from metaphi.algorithms.protonet import MetricLearner, _backbone, class_slots, cosine_similarities

#: steps of the attention LSTM of full-context embeddings where none are given
FCE_STEPS = 5
_FCE_HELP = ("Matching Networks: full-context embeddings (a bidirectional LSTM over the support set, an attention "
             "LSTM per query)")


@dataclass
class MatchingOptions:
    fce: bool = option(False, _FCE_HELP)
    fce_steps: int | None = option(None, f"Matching Networks with --fce: steps of the attention LSTM "
                                   f"(none: {FCE_STEPS})", check="positive")
    attention_scale: float = option(1.0, "Matching Networks: multiplies the cosine similarities before the "
                                    "attention's softmax (1: the paper)", check="positive")


@dataclass
class MatchingFCEOptions(MatchingOptions):
    fce: bool = option(True, _FCE_HELP)


def attention(query_z: Tensor, support_z: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """a(x̂, x_i) [queries, support]: a softmax over the support of scaled cosine similarities."""
    return torch.softmax(scale * cosine_similarities(query_z, support_z), dim=-1)


def lstm_cell(p: Params, x: Tensor, recurrent: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step (the gate order of ``nn.LSTMCell``: input, forget, cell, output)."""
    gates = x @ p["weight_ih"].T + recurrent @ p["weight_hh"].T + p["bias"]
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _cell_params(inputs: int, recurrent: int, hidden: int) -> Params:
    """An LSTM cell's weights with ``nn.LSTMCell``'s initialization, U(−1/√hidden, 1/√hidden)."""
    bound = hidden ** -0.5
    return {"weight_ih": torch.empty(4 * hidden, inputs).uniform_(-bound, bound),
            "weight_hh": torch.empty(4 * hidden, recurrent).uniform_(-bound, bound),
            "bias": torch.empty(4 * hidden).uniform_(-bound, bound)}


def support_context(p: Params, support_z: Tensor) -> Tensor:
    """g(x_i, S) = h→_i + h←_i + g'(x_i): a bidirectional LSTM over the support embeddings [n, d]."""
    d = support_z.shape[-1]
    outputs = {}
    for direction, order in (("forward", range(support_z.shape[0])), ("backward", reversed(range(support_z.shape[0])))):
        cell = prefixed(p, direction)
        h = c = support_z.new_zeros(d)
        for i in order:
            h, c = lstm_cell(cell, support_z[i], h, c)
            outputs[direction, i] = h
    n = support_z.shape[0]
    return support_z + torch.stack([outputs["forward", i] + outputs["backward", i] for i in range(n)])


def query_context(p: Params, query_z: Tensor, context: Tensor, steps: int) -> Tensor:
    """f(x̂, S): ``steps`` steps of the attention LSTM over ``context`` = g(S), for each query [m, d]."""
    h = c = torch.zeros_like(query_z)
    for _ in range(steps):
        read = torch.softmax(h @ context.T, dim=-1) @ context
        h_hat, c = lstm_cell(p, query_z, torch.cat([h, read], dim=-1), c)
        h = h_hat + query_z
    return h


class MatchingNet(MetricLearner):
    spec_class = "matching"
    Options = MatchingOptions

    def __init__(self, model: nn.Module, problem: Problem = CLASSIFICATION, options: MatchingOptions | None = None,
                 name: str = "matching"):
        options = options if options is not None else MatchingOptions()
        super().__init__(model, name, problem, options)
        if options.fce_steps is not None and not options.fce:
            raise UsageError("--fce-steps applies to Matching Networks with full-context embeddings "
                             "(--fce, matching-fce)")
        fce_steps = FCE_STEPS if options.fce_steps is None else options.fce_steps
        if fce_steps < 1:
            raise ValueError("fce_steps must be >= 1")
        fce = options.fce
        self.fce, self.fce_steps, self.scale = fce, int(fce_steps), float(options.attention_scale)
        d = model.feature_dim
        # drawn here, from the global generator the caller seeded, like the backbone's weights
        self._fce_params = {} if not fce else {
            **with_prefix(_cell_params(d, d, d), "fce.g.forward"),
            **with_prefix(_cell_params(d, d, d), "fce.g.backward"),
            **with_prefix(_cell_params(d, 2 * d, d), "fce.f"),
        }

    def _extra_params(self) -> Params:
        return {k: v.clone() for k, v in self._fce_params.items()}

    def attention(self, phi: Params, support: Any, xq: Tensor) -> Tensor:
        """The attention of each query over the support examples [queries, support]."""
        zs, zq = self.embed_episode(phi, support[0], xq)
        if self.fce:
            zs = support_context(prefixed(phi, "fce.g"), zs)
            zq = query_context(prefixed(phi, "fce.f"), zq, zs, self.fce_steps)
        return attention(zq, zs, self.scale)

    def scores(self, phi: Params, support: Any, xq: Tensor) -> tuple[Tensor, Tensor]:
        """log P(y = k | x̂, S) over the class slots; empty slots are masked by the caller."""
        a = self.attention(phi, support, xq)
        onehot, present = class_slots(support[1], support[1].shape[0], a.dtype)
        # P is exactly 0 for an empty slot; the floor keeps log's gradient finite there
        return torch.log((a @ onehot).clamp_min(torch.finfo(a.dtype).tiny)), present


def matching(benchmark, ways: int, inner_lr: float = 0.0, inner_steps: int = 0, eval_steps=None,
             options: MatchingOptions | None = None) -> MatchingNet:
    return MatchingNet(_backbone(benchmark, ways), options=options, name="matching")


def matching_fce(benchmark, ways: int, inner_lr: float = 0.0, inner_steps: int = 0, eval_steps=None,
                 options: MatchingOptions | None = None) -> MatchingNet:
    return MatchingNet(_backbone(benchmark, ways), options=options or MatchingFCEOptions(), name="matching-fce")
