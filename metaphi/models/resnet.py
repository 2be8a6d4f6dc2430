"""Residual backbones of the few-shot literature, with MAML's per-task batch norm.

- :class:`ResNet12`: four residual blocks (three 3x3 convs each, batch norm, leaky ReLU 0.1, a 1x1
  shortcut, 2x2 max pooling), widths 64-160-320-640, global average pooling (Lee et al. 2019,
  MetaOptNet; Tian et al. 2020, RFS). ``widths`` makes it narrower for a CPU.
- :class:`WideResNet`: WRN-depth-widen (Zagoruyko & Komodakis 2016); WRN-28-10 is the few-shot
  standard of LEO and FEAT: three groups of (depth - 4) / 6 pre-activation blocks of widths 16k,
  32k, 64k.
- :class:`TimmModel`: any ``timm`` architecture by name, built without weights (nothing downloads);
  its batch norms become per-task batch norm when an algorithm takes it.

Each has ``body``/``features``/``head`` like Conv4, and a ``spec`` its checkpoints rebuild it from.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.models.layers import TaskBatchNorm


class _ResBlock12(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), TaskBatchNorm(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), TaskBatchNorm(cout)
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), TaskBatchNorm(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), TaskBatchNorm(cout))

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.1)
        h = self.bn3(self.conv3(h))
        return F.max_pool2d(F.leaky_relu(h + self.shortcut(x), 0.1), 2, ceil_mode=True)


class ResNet12(nn.Module):
    """ResNet-12 (see the module's docstring); features are the average over space of the last block."""

    def __init__(self, in_channels: int = 3, out_features: int = 5, widths: Sequence[int] = (64, 160, 320, 640)):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"ResNet-12 has four blocks: give four positive widths, got {widths}")
        self.spec = {"name": "resnet12", "in_channels": in_channels, "out_features": out_features, "widths": widths}
        blocks, cin = [], in_channels
        for w in widths:
            blocks.append(_ResBlock12(cin, w))
            cin = w
        self.body = nn.Sequential(*blocks)
        self.feature_dim = widths[-1]
        self.head = nn.Linear(self.feature_dim, out_features)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = TaskBatchNorm(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = TaskBatchNorm(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return h + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` (see the module's docstring)."""

    def __init__(self, in_channels: int = 3, out_features: int = 5, depth: int = 28, widen: int = 10):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a wide ResNet's depth is 6n + 4 (10, 16, 22, 28, ...), got {depth}")
        if widen < 1:
            raise ValueError(f"widen must be positive, got {widen}")
        self.spec = {"name": "wrn", "in_channels": in_channels, "out_features": out_features, "depth": depth,
                     "widen": widen}
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)]
        cin = widths[0]
        for group, w in enumerate(widths[1:]):
            for i in range(n):
                layers.append(_WideBlock(cin, w, 2 if group > 0 and i == 0 else 1))
                cin = w
        layers += [TaskBatchNorm(cin), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.feature_dim = cin
        self.head = nn.Linear(cin, out_features)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class TimmModel(nn.Module):
    """``timm.create_model(architecture, pretrained=False)`` with ``out_features`` classes: the
    architecture only, randomly initialised (no weights are downloaded). Needs ``pip install timm``."""

    def __init__(self, architecture: str, in_channels: int = 3, out_features: int = 5):
        super().__init__()
        try:
            import timm
        except ImportError:
            raise ValueError(f"--model timm:{architecture} needs the timm package: pip install timm") from None
        try:
            self.net = timm.create_model(architecture, pretrained=False, num_classes=out_features,
                                         in_chans=in_channels)
        except Exception as e:  # an unknown architecture: timm says which exist
            raise ValueError(f"timm has no architecture '{architecture}' ({str(e).splitlines()[0][:120]})") from None
        self.spec = {"name": "timm", "architecture": architecture, "in_channels": in_channels,
                     "out_features": out_features}
        self.feature_dim = int(self.net.num_features)

    @property
    def head(self) -> nn.Module:
        """timm's classifier (its parameters keep their timm names, under ``net.``)."""
        return self.net.get_classifier()

    def features(self, x: Tensor) -> Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
