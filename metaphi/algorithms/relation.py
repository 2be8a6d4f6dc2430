"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales 2018, "Learning to Compare:
Relation Network for Few-Shot Learning").

The comparison itself is learned. The embedding f_φ (the backbone body, kept as feature maps) maps
each image to maps; class k is the element-wise sum of its support maps; a relation module g_φ takes
the channel-wise concatenation of a class's maps and a query's maps and gives a relation score

    r_{q,k} = sigmoid( g_φ( [ Σ_{i: y_i = k} f_φ(x_i) ; f_φ(x_q) ] ) ) ∈ [0, 1]

trained by regression onto the match indicator:  L(φ) = mean_{q,k} (r_{q,k} − [y_q = k])²  (MSE,
as in the paper). The query is assigned the class with the highest score.

The relation module follows the paper's shape scaled to our maps: two blocks of 3×3 convolution,
batch norm and ReLU, global average pooling (on 28-pixel Omniglot the maps are 2×2, too small for
the paper's max pooling), then a hidden fully connected layer of 8 units with ReLU and one output.
Its first convolution acts on a concatenation, so it is the sum of a convolution of the class maps
and one of the query maps: computing the two halves once per class and once per query, and adding
them for each pair, gives the same numbers for a fraction of the work.

As for the other metric learners (see protonet.py), the class axis has a slot per support example so
the same code runs under ``vmap`` for any number of ways; the empty slots are masked out of the
batch-norm statistics, of the loss and of the argmax, so the result equals the unpadded one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.config import option
from metaphi.functional import Params, call, prefixed, with_prefix
from metaphi.algorithms.base import CLASSIFICATION, Problem
from metaphi.algorithms.protonet import MetricLearner, _backbone, class_slots


def masked_batch_norm(x: Tensor, mask: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Batch norm of pairs x [q, k, C, H, W] with statistics over the pairs where ``mask`` [k] holds."""
    w = mask.to(x.dtype).view(1, -1, 1, 1, 1)
    count = w.sum() * x.shape[0] * x.shape[3] * x.shape[4]
    mean = (x * w).sum(dim=(0, 1, 3, 4), keepdim=True) / count
    var = ((x - mean).pow(2) * w).sum(dim=(0, 1, 3, 4), keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + eps) * weight.view(1, 1, -1, 1, 1) + bias.view(1, 1, -1, 1, 1)


class RelationModule(nn.Module):
    """g: (class maps [k, C, H, W], query maps [q, C, H, W], mask [k]) -> relation logits [q, k]."""

    def __init__(self, channels: int, hidden: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.bn1_weight, self.bn1_bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2_weight, self.bn2_bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.channels = channels

    def forward(self, class_maps: Tensor, query_maps: Tensor, mask: Tensor) -> Tensor:
        c = self.channels
        w = self.conv1.weight
        # conv([class; query]) = conv_class(class) + conv_query(query), paired by broadcasting
        from_class = F.conv2d(class_maps, w[:, :c], self.conv1.bias, padding=1)
        from_query = F.conv2d(query_maps, w[:, c:], padding=1)
        h = from_query.unsqueeze(1) + from_class.unsqueeze(0)  # [q, k, C, H, W]
        h = torch.relu(masked_batch_norm(h, mask, self.bn1_weight, self.bn1_bias))
        q, k = h.shape[:2]
        h = self.conv2(h.flatten(0, 1)).unflatten(0, (q, k))
        h = torch.relu(masked_batch_norm(h, mask, self.bn2_weight, self.bn2_bias))
        h = torch.relu(self.fc1(h.mean(dim=(3, 4))))
        return self.fc2(h).squeeze(-1)


@dataclass
class RelationOptions:
    relation_hidden: int = option(8, "Relation Networks: units of the relation module's hidden layer", check="positive")


class RelationNet(MetricLearner):
    spec_class = "relation"
    Options = RelationOptions

    def __init__(self, model: nn.Module, problem: Problem = CLASSIFICATION, options: RelationOptions | None = None,
                 name: str = "relation"):
        if not hasattr(model, "pool"):
            raise ValueError("Relation Networks compare feature maps and need a convolutional backbone (conv4)")
        super().__init__(model, name, problem, options)
        self.hidden = self.options.relation_hidden
        self.relation = RelationModule(model.spec["hidden"], self.hidden)

    def _extra_params(self) -> Params:
        return with_prefix({k: v.detach().clone() for k, v in self.relation.named_parameters()}, "relation")

    def embed_maps(self, phi: Params, x: Tensor) -> Tensor:
        """f_φ(x) as feature maps [n, C, H, W]: the backbone body before its pooling."""
        return call(self.model.body, prefixed(phi, "embed.body"), x)

    def scores(self, phi: Params, support: Any, xq: Tensor) -> tuple[Tensor, Tensor]:
        """Relation logits (before the sigmoid) [queries, class slots], and which slots are filled."""
        xs, ys = support
        maps = self.embed_maps(phi, torch.cat([xs, xq]))
        support_maps, query_maps = maps[: xs.shape[0]], maps[xs.shape[0]:]
        onehot, present = class_slots(ys, ys.shape[0], maps.dtype)
        class_maps = (onehot.T @ support_maps.flatten(1)).view(-1, *support_maps.shape[1:])
        return call(self.relation, prefixed(phi, "relation"), class_maps, query_maps, present), present

    def _query_loss(self, scores: Tensor, present: Tensor, yq: Tensor) -> Tensor:
        target, _ = class_slots(yq, scores.shape[-1], scores.dtype)
        weight = present.to(scores.dtype).expand_as(scores)
        return ((torch.sigmoid(scores) - target).pow(2) * weight).sum() / weight.sum()


def relation(benchmark, ways: int, inner_lr: float = 0.0, inner_steps: int = 0, eval_steps=None,
             options: RelationOptions | None = None) -> RelationNet:
    return RelationNet(_backbone(benchmark, ways), options=options, name="relation")
