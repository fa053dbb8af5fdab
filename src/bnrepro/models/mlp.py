"""The MNIST network of Section 4.1: 784-100-100-100-10, BN optional before each nonlinearity."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from bnrepro.choices import ACTIVATION_NAMES, NORMS
from bnrepro.models.batchnorm import make_batchnorm

ACTIVATIONS = dict(zip(ACTIVATION_NAMES, (nn.Sigmoid, nn.ReLU), strict=True))


class MLP(nn.Module):
    """Fully connected hidden layers h1..hN, each Linear -> [BN] -> activation -> [dropout].

    With BN the Linear has no bias: BN's beta replaces it (Section 3.2). The activation
    modules are kept as named modules so that probes can hook their inputs.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        activation: str = "sigmoid",
        norm: str = "none",
        dropout: float = 0.0,
        init_std: float = 0.1,
        bn: dict | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        bn = dict(bn or {})
        self.layers = nn.ModuleDict()
        width = in_features
        for i, out in enumerate(hidden, start=1):
            block = nn.Sequential()
            block.add_module("linear", nn.Linear(width, out, bias=norm == "none"))
            if norm == "bn":
                block.add_module(
                    "bn",
                    make_batchnorm(
                        out,
                        stats=bn.get("stats", "ema"),
                        momentum=bn.get("momentum", 0.1),
                        eps=bn.get("eps", 1e-5),
                    ),
                )
            block.add_module("act", ACTIVATIONS[activation]())
            if dropout > 0:
                block.add_module("dropout", nn.Dropout(dropout))
            self.layers[f"h{i}"] = block
            width = out
        self.classifier = nn.Linear(width, num_classes)
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float) -> None:
        """Small random Gaussian weights (Section 4.1), zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def nonlinearities(self) -> dict[str, nn.Module]:
        """The activation module of each hidden layer, by layer name (h1, h2, ...)."""
        return {name: block.act for name, block in self.layers.items()}

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers.values():
            x = block(x)
        return self.classifier(x)
