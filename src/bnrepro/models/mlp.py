"""The MNIST network of Section 4.1: 784-100-100-100-10, BN optional before each nonlinearity."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from bnrepro.models.batchnorm import BNStats, network_bn
from bnrepro.schema import Activation, choices

ACTIVATIONS = dict(zip(choices(Activation), (nn.Sigmoid, nn.ReLU), strict=True))


def mlp_layers(
    in_features: int,
    hidden: Sequence[int],
    num_classes: int,
    activation: str,
    dropout: float,
    linear: Callable[[int, int, bool], nn.Module],
    bn_layer: Callable[[int], nn.Module] | None,
) -> tuple[nn.ModuleDict, nn.Module]:
    """Hidden layers h1..hN, each linear -> [BN] -> activation -> [dropout], and the classifier.

    `linear(in, out, bias)` and `bn_layer(features)` make the layers (plain for MLP, stacked for
    StackedMLP); `bn_layer=None` builds no BN. With BN the linear map has no bias: BN's beta
    replaces it (Section 3.2). Each activation is a named module (`act`) so probes can hook
    its input.
    """
    layers = nn.ModuleDict()
    width = in_features
    for i, out in enumerate(hidden, start=1):
        block = nn.Sequential()
        block.add_module("linear", linear(width, out, bn_layer is None))
        if bn_layer is not None:
            block.add_module("bn", bn_layer(out))
        block.add_module("act", ACTIVATIONS[activation]())
        if dropout > 0:
            block.add_module("dropout", nn.Dropout(dropout))
        layers[f"h{i}"] = block
        width = out
    return layers, linear(width, num_classes, True)


def init_gaussian(linears: Iterable[nn.Module], init_std: float) -> None:
    """Small random Gaussian weights (Section 4.1), zero biases, drawn in the given order."""
    for module in linears:
        nn.init.normal_(module.weight, mean=0.0, std=init_std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MLP(nn.Module):
    """Fully connected hidden layers h1..hN (see `mlp_layers`) and a linear classifier.

    `bn` (the config's model.bn, or a BNStats) is required with norm="bn"; `self.bn_stats`
    keeps it as a BNStats (None without BN).
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
        bn: Mapping[str, Any] | BNStats | None = None,
    ) -> None:
        super().__init__()
        self.bn_stats = network_bn(norm, bn)
        bn_layer = None if self.bn_stats is None else self.bn_stats.layer
        self.layers, self.classifier = mlp_layers(
            in_features, hidden, num_classes, activation, dropout, nn.Linear, bn_layer
        )
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float) -> None:
        """Small random Gaussian weights (Section 4.1), zero biases."""
        init_gaussian([*(b.linear for b in self.layers.values()), self.classifier], init_std)

    def nonlinearities(self) -> dict[str, nn.Module]:
        """The activation module of each hidden layer, by layer name (h1, h2, ...)."""
        return {name: block.act for name, block in self.layers.items()}

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers.values():
            x = block(x)
        return self.classifier(x)
