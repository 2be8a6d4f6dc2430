from __future__ import annotations

from torch import Tensor, nn

from metaphi.models.layers import Conv2d, TaskBatchNorm


class Conv4(nn.Module):
    """The four-block convnet of the few-shot literature (Vinyals et al. 2016; Finn et al. 2017).

    Each block: 3x3 conv, task batch norm, ReLU, and then either stride 2 (MAML's Omniglot network,
    features averaged over space at the end) or 2x2 max pooling (the miniImageNet network,
    features flattened). ``pool="max3"`` pools after the first three blocks only: the same
    computation as "max", a feature grid twice as fine each way (4 x 4 x hidden from 32 x 32 images).
    """

    POOLS = ("stride", "max", "max3")

    def __init__(self, in_channels: int = 1, out_features: int = 5, hidden: int = 64, image_size: int = 28,
                 pool: str = "stride"):
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {', '.join(self.POOLS)}, not {pool!r}")
        self.spec = {"name": "conv4", "in_channels": in_channels, "out_features": out_features, "hidden": hidden,
                     "image_size": image_size, "pool": pool}
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for block in range(4):
            if pool == "stride":
                layers += [Conv2d(channels, hidden, 3, stride=2, padding=1), TaskBatchNorm(hidden), nn.ReLU()]
                size = (size + 1) // 2
            else:
                layers += [Conv2d(channels, hidden, 3, padding=1), TaskBatchNorm(hidden), nn.ReLU()]
                if pool == "max" or block < 3:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            channels = hidden
        self.body = nn.Sequential(*layers)
        self.pool = pool
        self.feature_dim = hidden if pool == "stride" else hidden * max(size, 1) ** 2
        self.head = nn.Linear(self.feature_dim, out_features)

    def features(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return h.mean(dim=(2, 3)) if self.pool == "stride" else h.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
