"""Several MLPs trained side by side as one module: the fast path for seed sweeps.

Member i of a StackedMLP computes exactly what an `MLP` with member i's weights computes;
the members share nothing but the kernels. Activations are kept feature-major, (M, F, B):
each layer is one batched matrix product W (M, out, in) @ h (M, in, B), and BN is torch's own
kernel on the free view (1, M*F, B) (models/batchnorm.StackedBatchNorm), one channel per member
and feature with statistics over the B examples, so no layer copies or transposes anything and
members never mix. Each norm's stacked layers come from models/norms.NORM_LAYERS.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from bnrepro.models.mlp import MLP, init_gaussian, mlp_layers
from bnrepro.models.norms import NO_NORM, Normalization


class StackedLinear(nn.Module):
    """`members` independent Linear layers on feature-major input: (M, in, B) -> (M, out, B)."""

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(members, out_features, 1)) if bias else None

    def forward(self, h: Tensor) -> Tensor:
        members, out, _ = self.weight.shape
        if h.dim() == 2:  # one (in, B) input for every member: a single large matmul
            y = torch.matmul(self.weight.flatten(0, 1), h).view(members, out, -1)
            return y if self.bias is None else y + self.bias
        if self.bias is None:
            return torch.bmm(self.weight, h)
        return torch.baddbmm(self.bias, self.weight, h)


class StackedMLP(nn.Module):
    """`members` MLPs of identical shape, built from MLP's own arguments.

    Input (M, B, in), member i's batch in row i, or (B, in) shared by all members; output
    logits (M, B, classes). A fresh StackedMLP draws its own Gaussian weights; `load_member`
    copies in an MLP's, so member i can start exactly where its plain run would.
    """

    def __init__(
        self,
        members: int,
        in_features: int = 784,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        activation: str = "sigmoid",
        norm: Normalization = NO_NORM,
        dropout: float = 0.0,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.members = members
        self.normalization = norm
        self.layers, self.classifier = mlp_layers(
            in_features,
            hidden,
            num_classes,
            activation,
            dropout,
            partial(StackedLinear, members),
            partial(self.normalization.stacked_layers, members),
            self.normalization.has_beta,
        )
        init_gaussian([*(b.linear for b in self.layers.values()), self.classifier], init_std)

    @classmethod
    def from_members(cls, mlps: Sequence[MLP], **mlp_kwargs: Any) -> StackedMLP:
        """Stack initialised MLPs built with `mlp_kwargs` (MLP's arguments), copying their
        weights and buffers."""
        stacked = cls(len(mlps), **mlp_kwargs)
        for i, mlp in enumerate(mlps):
            stacked.load_member(i, mlp)
        return stacked

    @torch.no_grad()
    def load_member(self, i: int, mlp: MLP) -> None:
        """Copy one plain MLP's parameters and normalisation buffers into member i.

        The MLP must have been built from the same arguments; shapes and norm settings are
        checked.
        """
        mismatch = ValueError(f"member {i}: the MLP was built with other arguments than the stack")
        if mlp.normalization != self.normalization or _blocks(mlp) != _blocks(self):
            raise mismatch
        pairs = [(self.classifier, mlp.classifier)]
        pairs += [(self.layers[n].linear, mlp.layers[n].linear) for n in self.layers]
        if any(stacked.weight.shape[1:] != plain.weight.shape for stacked, plain in pairs):
            raise mismatch  # copy_ would broadcast some of these
        for stacked, plain in pairs:
            stacked.weight[i].copy_(plain.weight)
            if stacked.bias is not None:
                stacked.bias[i, :, 0].copy_(plain.bias)
        for name, block in self.layers.items():
            for kind in ("bn", "norm"):  # the per-feature tensors of any norm, member-major
                if kind not in block._modules:
                    continue
                stacked, plain = block._modules[kind], mlp.layers[name]._modules[kind]
                f = stacked.features
                for attr in ("weight", "bias", "running_mean", "running_var", "running_std"):
                    if hasattr(plain, attr):
                        getattr(stacked, attr)[i * f : (i + 1) * f].copy_(getattr(plain, attr))

    def nonlinearities(self) -> dict[str, nn.Module]:
        """Activation modules by layer; their inputs are feature-major, (M, F, B)."""
        return {name: block.act for name, block in self.layers.items()}

    def forward(self, x: Tensor) -> Tensor:
        # Feature-major views, no copies: (M, B, in) -> (M, in, B), or a shared (B, in) batch
        # -> (in, B), which the first layer turns into (M, out, B).
        h = x.transpose(-1, -2)
        for block in self.layers.values():
            h = block(h)
        # (M, B, classes) logits as a view: member_losses turns them back without a copy.
        return self.classifier(h).transpose(1, 2)


def _blocks(model: MLP | StackedMLP) -> list[tuple[str, type, float]]:
    """Each hidden layer's name, activation and dropout: what `load_member` cannot see in
    the weights' shapes."""
    return [
        (name, type(block.act), getattr(block._modules.get("dropout"), "p", 0.0))
        for name, block in model.layers.items()
    ]
