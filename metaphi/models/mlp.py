from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """A fully connected net; MAML's sinusoid regressor is ``MLP(1, 1, (40, 40))``."""

    def __init__(self, in_features: int = 1, out_features: int = 1, hidden: tuple[int, ...] | list[int] = (40, 40),
                 activation: str = "relu"):
        super().__init__()
        acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}")
        hidden = list(hidden)
        self.spec = {"name": "mlp", "in_features": in_features, "out_features": out_features, "hidden": hidden,
                     "activation": activation}
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), acts[activation]()]
            width = h
        self.body = nn.Sequential(*layers)
        self.feature_dim = width
        self.head = nn.Linear(width, out_features)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
