"""Small stride-2 convnets without batch statistics: for learners that see one example at a time
(continual learning) or must not normalise a test batch by its own domain (domain generalization).

Both have a ``body`` (features) and a ``head`` (the last linear layer), as every backbone here does,
so a method can adapt or meta-learn the two apart (OML's representation/prediction split, Javed &
White 2019; fine-tuning the head on a new domain).
"""
from __future__ import annotations

from torch import Tensor, nn

from metaphi.models.layers import GroupNorm


class PlainConvNet(nn.Module):
    """The network every continual method trains: ``blocks`` x (3x3 conv stride 2, ReLU), He-initialized,
    the features flattened, one linear head with an output per class of the stream.

    A continual learner updates on a few examples at a time, often one, so the network has no batch
    normalization (whose statistics of a batch of one are meaningless) and no running state.

    Its ``spec`` holds the constructor arguments without a ``"name"``: it is stored in continual
    checkpoints and hashed into OML's meta-training folder names, so it is kept as it was; use
    :func:`metaphi.models.spec_of` for a spec that :func:`metaphi.models.build_model` rebuilds.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: int = 32, blocks: int = 4,
                 image_size: int = 28):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(blocks):
            conv = nn.Conv2d(channels, hidden, 3, stride=2, padding=1)
            # He initialization: with no normalization, torch's default (which shrinks the signal by
            # about 2.4 per layer) leaves the deep end silent and the network stuck at chance
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            channels, size = hidden, (size + 1) // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.feature_dim = hidden * size * size
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.spec = {"in_channels": in_channels, "num_classes": num_classes, "hidden": hidden, "blocks": blocks,
                     "image_size": image_size}

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class GroupNormConvNet(nn.Module):
    """A small convnet for domain generalization (MLDG): ``blocks`` x (3x3 conv stride 2, group norm,
    ReLU), features averaged over space, a linear head. No batch statistics (see GroupNorm)."""

    def __init__(self, in_channels: int = 1, out_features: int = 10, hidden: int = 32, blocks: int = 4,
                 groups: int = 4):
        super().__init__()
        self.spec = {"name": "dg-convnet", "in_channels": in_channels, "out_features": out_features,
                     "hidden": hidden, "blocks": blocks, "groups": groups}
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1), GroupNorm(hidden, groups), nn.ReLU()]
            channels = hidden
        self.body = nn.Sequential(*layers)
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, out_features)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor, features: bool = False) -> Tensor:
        """Logits, or with ``features`` the penultimate features (so a functional call can stop there)."""
        h = self.features(x)
        return h if features else self.head(h)
