"""The MNIST network of Section 4.1: 784-100-100-100-10, BN optional before each nonlinearity."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import Tensor, nn

from bnrepro.config.schema import Activation, choices
from bnrepro.models.norms import NO_NORM, Normalization

ACTIVATIONS = dict(zip(choices(Activation), (nn.Sigmoid, nn.ReLU), strict=True))


def mlp_layers(
    in_features: int,
    hidden: Sequence[int],
    num_classes: int,
    activation: str,
    dropout: float,
    linear: Callable[[int, int, bool], nn.Module],
    norm_layers: Callable[[int], dict[str, nn.Module]],
    has_beta: bool,
) -> tuple[nn.ModuleDict, nn.Module]:
    """Hidden layers h1..hN, each linear -> [norm] -> activation -> [dropout], and the
    classifier.

    `linear(in, out, bias)` and `norm_layers(features)` make the layers (plain for MLP, stacked
    for StackedMLP; models/norms.py). With a normalisation that has a beta (`has_beta`) the
    linear map has no bias: the beta replaces it (Section 3.2). Each activation is a named
    module (`act`) so probes can hook its input.
    """
    layers = nn.ModuleDict()
    width = in_features
    for i, out in enumerate(hidden, start=1):
        block = nn.Sequential()
        block.add_module("linear", linear(width, out, not has_beta))
        for name, module in norm_layers(out).items():
            block.add_module(name, module)
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

    `norm` (models/norms.Normalization: model.norm with its settings, built once per run)
    makes the layers between each linear map and its activation; kept as `self.normalization`.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        activation: str = "sigmoid",
        norm: Normalization = NO_NORM,
        dropout: float = 0.0,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.normalization = norm
        self.layers, self.classifier = mlp_layers(
            in_features,
            hidden,
            num_classes,
            activation,
            dropout,
            nn.Linear,
            self.normalization.layers,
            self.normalization.has_beta,
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
