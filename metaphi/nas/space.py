"""A cell-based search space of small conv nets: mixed operations, genotypes, export and rebuild.

The space is DARTS's (Liu, Simonyan & Yang 2019, "DARTS: Differentiable Architecture Search"), made
small enough for a CPU. A network is a 3x3 stem, ``layers`` cells and a linear classifier on the
spatially averaged features. Cells at positions ⌊layers/3⌋ and ⌊2·layers/3⌋ are *reduction* cells
(stride 2, twice the channels); the others are *normal* cells. All normal cells share one genotype,
all reduction cells another.

A cell is a DAG. Node 0 is the cell's input (the previous cell's output through a ReLU-1x1 conv-BN
that sets the channels); intermediate nodes 1..n are

    x_i = Σ_{j<i} o_{j,i}(x_j)

and the cell's output is the concatenation of x_1..x_n (n·C channels). In a reduction cell the edges
leaving node 0 have stride 2. The operations on an edge come from ``OPS`` (zero, identity, 3x3 max
and average pooling, 3x3 and 5x5 convolutions, a 3x3 convolution with dilation 2; convolutions are
ReLU-conv-BN as in DARTS).

*Search network* (the DARTS relaxation): every edge carries every operation, mixed by the softmax of
its architecture weights α,

    ō_{j,i}(x) = Σ_o softmax(α_{j,i})_o · o(x),

with α = {"normal": [E, |OPS|], "reduce": [E, |OPS|]} and E = n(n+1)/2 edges per cell.

*Genotype* (a discrete architecture): node i keeps k_i = min(2, i) of its incoming edges, each with
one non-zero operation. ``derive`` reads it off α as DARTS does: the k_i edges whose strongest
non-zero operation is strongest, each with that operation. ``DiscreteSpace`` enumerates the same
genotypes as categorical decisions (for node i: which k_i predecessors, then an operation for each),
so that the black-box searchers (metaphi/nas/blackbox.py) sample exactly the architectures DARTS can
export. Simplification against DARTS: a cell has one input (the previous cell) instead of two, so
node 1 has a single incoming edge.

Everything is deterministic by an explicit ``torch.Generator``: ``init_params`` draws a network's
weights from one, so the same genotype and seed give the same network bit for bit.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.functional import Params
from metaphi.models.layers import TaskBatchNorm

OPS: tuple[str, ...] = ("zero", "skip", "max_pool_3x3", "avg_pool_3x3", "conv_3x3", "conv_5x5", "dil_conv_3x3")
ZERO = "zero"


# -- operations ---------------------------------------------------------------------------------
class Zero(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, ::self.stride, ::self.stride] * 0.0


class ReLUConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation=dilation, bias=False)
        self.bn = TaskBatchNorm(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(F.relu(x)))


def make_op(name: str, channels: int, stride: int) -> nn.Module:
    """One operation of ``OPS`` on ``channels`` channels; stride 2 halves the resolution."""
    if name == "zero":
        return Zero(stride)
    if name == "skip":  # at stride 2 a 1x1 conv (DARTS uses a factorized reduce; one conv is enough here)
        return nn.Identity() if stride == 1 else ReLUConvBN(channels, channels, 1, stride, 0)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride, padding=1)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)
    if name == "conv_3x3":
        return ReLUConvBN(channels, channels, 3, stride, 1)
    if name == "conv_5x5":
        return ReLUConvBN(channels, channels, 5, stride, 2)
    if name == "dil_conv_3x3":
        return ReLUConvBN(channels, channels, 3, stride, 2, dilation=2)
    raise ValueError(f"unknown operation '{name}' (known: {', '.join(OPS)})")


def edges_of(nodes: int) -> list[tuple[int, int]]:
    """The (from, to) pairs of a cell with ``nodes`` intermediate nodes, in α's row order."""
    return [(j, i) for i in range(1, nodes + 1) for j in range(i)]


def reduction_layers(layers: int) -> set[int]:
    """Positions of the reduction cells (DARTS: ⌊layers/3⌋ and ⌊2·layers/3⌋)."""
    return {layers // 3, 2 * layers // 3} if layers >= 3 else {layers // 2} if layers == 2 else set()


# -- genotypes ----------------------------------------------------------------------------------
Node = tuple[tuple[str, int], ...]  # the (operation, input node) pairs summed into one node


@dataclass(frozen=True)
class Genotype:
    """A discrete architecture: for each intermediate node of the normal and of the reduction cell,
    its (operation, input node) pairs, sorted by input."""

    normal: tuple[Node, ...]
    reduce: tuple[Node, ...]

    def __post_init__(self):
        for kind in ("normal", "reduce"):  # canonical order: a genotype has one module structure
            object.__setattr__(self, kind, tuple(tuple(sorted(((str(op), int(j)) for op, j in node),
                                                              key=lambda p: (p[1], p[0])))
                                                 for node in getattr(self, kind)))
        for kind in ("normal", "reduce"):
            cell = getattr(self, kind)
            for i, node in enumerate(cell, start=1):
                if not node:
                    raise ValueError(f"{kind} node {i} has no input")
                for op, j in node:
                    if op not in OPS or op == ZERO:
                        raise ValueError(f"{kind} node {i}: '{op}' is not an operation of a genotype "
                                         f"(valid: {', '.join(o for o in OPS if o != ZERO)})")
                    if not 0 <= j < i:
                        raise ValueError(f"{kind} node {i} takes input from node {j}; it must be one of 0..{i - 1}")
        if len(self.normal) != len(self.reduce):
            raise ValueError("the normal and the reduction cell must have the same number of nodes")

    @property
    def nodes(self) -> int:
        return len(self.normal)

    def to_dict(self) -> dict:
        return {"normal": [[list(p) for p in node] for node in self.normal],
                "reduce": [[list(p) for p in node] for node in self.reduce]}

    @staticmethod
    def from_dict(d: Mapping) -> "Genotype":
        try:
            cells = {k: tuple(tuple((str(op), int(j)) for op, j in node) for node in d[k])
                     for k in ("normal", "reduce")}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a genotype: expected {{'normal': [[[op, input], ...], ...], 'reduce': ...}} ({e})")
        return Genotype(cells["normal"], cells["reduce"])

    def __str__(self) -> str:
        def cell(nodes):
            return "; ".join(f"{i}←" + "+".join(f"{op}({j})" for op, j in node) for i, node in enumerate(nodes, 1))
        return f"normal[{cell(self.normal)}] reduce[{cell(self.reduce)}]"


@dataclass(frozen=True)
class NetworkConfig:
    """The frame a genotype or α is placed in: input, classes, width, depth, cell size, operations."""

    in_channels: int = 1
    num_classes: int = 10
    channels: int = 8
    layers: int = 3
    nodes: int = 3
    ops: tuple[str, ...] = OPS

    def __post_init__(self):
        if self.channels < 1 or self.layers < 1 or self.nodes < 1:
            raise ValueError("channels, layers and nodes must be positive")
        bad = [o for o in self.ops if o not in OPS]
        if bad:
            raise ValueError(f"unknown operations {bad} (known: {', '.join(OPS)})")
        if not any(o != ZERO for o in self.ops):
            raise ValueError("the operations must include one besides 'zero'")
        object.__setattr__(self, "ops", tuple(self.ops))

    def to_dict(self) -> dict:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "channels": self.channels,
                "layers": self.layers, "nodes": self.nodes, "ops": list(self.ops)}

    @staticmethod
    def from_dict(d: Mapping) -> "NetworkConfig":
        return NetworkConfig(int(d["in_channels"]), int(d["num_classes"]), int(d["channels"]), int(d["layers"]),
                             int(d["nodes"]), tuple(d.get("ops", OPS)))

    def alpha_shape(self) -> tuple[int, int]:
        return len(edges_of(self.nodes)), len(self.ops)


def export(genotype: Genotype, config: NetworkConfig) -> str:
    """The JSON text of an architecture: its genotype and the network it is placed in."""
    return json.dumps({"genotype": genotype.to_dict(), "network": config.to_dict()}, indent=2)


def load_exported(text: str) -> tuple[Genotype, NetworkConfig]:
    """Inverse of ``export``."""
    try:
        d = json.loads(text)
        return Genotype.from_dict(d["genotype"]), NetworkConfig.from_dict(d["network"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"not an exported architecture (expected JSON with 'genotype' and 'network'): {e}") from e


def derive(alpha: Mapping[str, Tensor], config: NetworkConfig) -> Genotype:
    """DARTS's discretization: node i keeps the min(2, i) incoming edges whose strongest non-zero
    operation has the largest softmax weight, each with that operation."""
    nonzero = [k for k, o in enumerate(config.ops) if o != ZERO]
    edges = edges_of(config.nodes)
    cells = {}
    for kind in ("normal", "reduce"):
        w = torch.softmax(alpha[kind].detach().double(), -1)[:, nonzero]
        cell = []
        for i in range(1, config.nodes + 1):
            rows = [(e, j) for e, (j, t) in enumerate(edges) if t == i]
            strength = [(float(w[e].max()), j, config.ops[nonzero[int(w[e].argmax())]]) for e, j in rows]
            keep = sorted(strength, key=lambda s: (-s[0], s[1]))[:min(2, i)]
            cell.append(tuple((op, j) for _, j, op in keep))
        cells[kind] = tuple(cell)
    return Genotype(cells["normal"], cells["reduce"])


# -- networks -----------------------------------------------------------------------------------
class MixedOp(nn.Module):
    """ō(x) = Σ_o w_o · o(x) over the operations of one edge."""

    def __init__(self, channels: int, stride: int, ops: Sequence[str]):
        super().__init__()
        self.ops = nn.ModuleList([make_op(o, channels, stride) for o in ops])

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class Cell(nn.Module):
    """One cell: the search cell (every edge a ``MixedOp``) when ``node_ops`` is None, else the
    discrete cell of a genotype's nodes."""

    def __init__(self, c_in: int, channels: int, reduction: bool, nodes: int, ops: Sequence[str],
                 node_ops: Sequence[Node] | None = None):
        super().__init__()
        self.reduction, self.nodes = reduction, nodes
        self.preprocess = ReLUConvBN(c_in, channels, 1, 1, 0)
        self.search = node_ops is None
        if self.search:
            self.edges = nn.ModuleList([MixedOp(channels, 2 if reduction and j == 0 else 1, ops)
                                        for j, _ in edges_of(nodes)])
        else:
            if len(node_ops) != nodes:
                raise ValueError(f"a genotype with {len(node_ops)} nodes placed in cells of {nodes}")
            self.inputs = [[j for _, j in node] for node in node_ops]
            self.edges = nn.ModuleList([nn.ModuleList([make_op(op, channels, 2 if reduction and j == 0 else 1)
                                                       for op, j in node]) for node in node_ops])

    def forward(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        states = [self.preprocess(x)]
        if self.search:
            e = 0
            for i in range(1, self.nodes + 1):
                states.append(sum(self.edges[e + j](states[j], weights[e + j]) for j in range(i)))
                e += i
        else:
            for inputs, ops in zip(self.inputs, self.edges):
                states.append(sum(op(states[j]) for op, j in zip(ops, inputs)))
        return torch.cat(states[1:], dim=1)


class Network(nn.Module):
    """Stem, cells, global average pooling, linear classifier.

    ``genotype=None``: the search network, called as ``net(x, alpha)`` with α = {"normal": [E, O],
    "reduce": [E, O]} (logits; the softmax is taken inside). With a genotype: the discrete network,
    called as ``net(x)``.
    """

    def __init__(self, config: NetworkConfig, genotype: Genotype | None = None):
        super().__init__()
        if genotype is not None and genotype.nodes != config.nodes:
            raise ValueError(f"the genotype has {genotype.nodes} nodes per cell, the network {config.nodes}")
        self.config, self.genotype = config, genotype
        c = config.channels
        self.stem = nn.Sequential(nn.Conv2d(config.in_channels, c, 3, padding=1, bias=False), TaskBatchNorm(c))
        reductions = reduction_layers(config.layers)
        cells, c_prev = [], c
        self.kinds = []
        for layer in range(config.layers):
            reduction = layer in reductions
            if reduction:
                c *= 2
            kind = "reduce" if reduction else "normal"
            node_ops = None if genotype is None else getattr(genotype, kind)
            cells.append(Cell(c_prev, c, reduction, config.nodes, config.ops, node_ops))
            self.kinds.append(kind)
            c_prev = c * config.nodes
        self.cells = nn.ModuleList(cells)
        self.head = nn.Linear(c_prev, config.num_classes)

    def forward(self, x: Tensor, alpha: Mapping[str, Tensor] | None = None) -> Tensor:
        if self.genotype is None:
            if alpha is None:
                raise ValueError("the search network needs the architecture weights: net(x, alpha)")
            weights = {k: torch.softmax(alpha[k], -1) for k in ("normal", "reduce")}
        h = self.stem(x)
        for kind, cell in zip(self.kinds, self.cells):
            h = cell(h, weights[kind] if self.genotype is None else None)
        return self.head(h.mean(dim=(2, 3)))


def init_params(module: nn.Module, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh weights drawn from ``generator`` (torch's default scales: conv and linear weights and biases
    uniform in ±1/√fan_in, batch-norm scale 1 and shift 0); the module's own tensors are not used."""
    params = {}
    for name, p in module.named_parameters():
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        if isinstance(owner, TaskBatchNorm):
            value = torch.ones(p.shape, dtype=torch.float64) if name.endswith("weight") else \
                torch.zeros(p.shape, dtype=torch.float64)
        else:
            bound = 1.0 / math.sqrt(owner.weight[0].numel())
            value = (torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        params[name] = value.to(dtype)
    return params


def alpha_init(config: NetworkConfig, generator: torch.Generator, scale: float = 1e-3,
               dtype: torch.dtype = torch.float32) -> Params:
    """α as DARTS starts it: small Gaussian logits (1e-3·N(0, 1)), nearly uniform mixing."""
    shape = config.alpha_shape()
    return {k: (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
            for k in ("normal", "reduce")}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- the same genotypes as categorical decisions (for the black-box searchers) --------------------
@dataclass(frozen=True)
class DiscreteSpace:
    """Genotypes as a sequence of categorical decisions.

    For each cell kind and node i: ``inputs`` picks one of the C(i, k_i) sets of k_i = min(2, i)
    predecessors, then ``op{s}`` picks a non-zero operation for the s-th of them. Every choice vector
    is a valid genotype and every genotype has exactly one choice vector."""

    nodes: int = 3
    ops: tuple[str, ...] = OPS
    decisions: tuple[tuple[str, int], ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        names = []
        for kind in ("normal", "reduce"):
            for i in range(1, self.nodes + 1):
                names.append((f"{kind}.node{i}.inputs", len(self._combos(i))))
                for s in range(min(2, i)):
                    names.append((f"{kind}.node{i}.op{s}", len(self.choices_ops)))
        object.__setattr__(self, "decisions", tuple(names))

    @property
    def choices_ops(self) -> tuple[str, ...]:
        return tuple(o for o in self.ops if o != ZERO)

    @staticmethod
    def _combos(i: int) -> list[tuple[int, ...]]:
        return list(itertools.combinations(range(i), min(2, i)))

    def size(self) -> int:
        return math.prod(n for _, n in self.decisions)

    def decode(self, choice: Sequence[int]) -> Genotype:
        if len(choice) != len(self.decisions):
            raise ValueError(f"a choice vector of this space has {len(self.decisions)} entries, got {len(choice)}")
        it = iter(zip(choice, self.decisions))
        cells = {}
        for kind in ("normal", "reduce"):
            cell = []
            for i in range(1, self.nodes + 1):
                c, (_, n) = next(it)
                if not 0 <= int(c) < n:
                    raise ValueError(f"choice {int(c)} out of range for a decision with {n} options")
                inputs = self._combos(i)[int(c)]
                node = []
                for j in inputs:
                    c, (_, n) = next(it)
                    if not 0 <= int(c) < n:
                        raise ValueError(f"choice {int(c)} out of range for a decision with {n} options")
                    node.append((self.choices_ops[int(c)], j))
                cell.append(tuple(node))
            cells[kind] = tuple(cell)
        return Genotype(cells["normal"], cells["reduce"])

    def encode(self, genotype: Genotype) -> list[int]:
        if genotype.nodes != self.nodes:
            raise ValueError(f"a genotype with {genotype.nodes} nodes in a space of {self.nodes}")
        out = []
        for kind in ("normal", "reduce"):
            for i, node in enumerate(getattr(genotype, kind), start=1):
                inputs = tuple(sorted(j for _, j in node))
                if inputs not in self._combos(i):
                    raise ValueError(f"{kind} node {i} takes inputs {inputs}; this space needs {min(2, i)} "
                                     f"distinct ones of 0..{i - 1}")
                out.append(self._combos(i).index(inputs))
                for op, _ in sorted(node, key=lambda p: (p[1], p[0])):
                    out.append(self.choices_ops.index(op))
        return out

    def uniform(self, generator: torch.Generator) -> list[int]:
        return [int(torch.randint(n, (1,), generator=generator)) for _, n in self.decisions]
