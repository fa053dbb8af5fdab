"""Several MLPs trained side by side as one module: the fast path for seed sweeps.

Member i of a StackedMLP computes exactly what an `MLP` with member i's weights computes;
the members share nothing but the kernels. Activations are kept feature-major, (M, F, B):
each layer is one batched matrix product W (M, out, in) @ h (M, in, B), and BN is torch's own
kernel on the free view (1, M*F, B), one channel per member and feature with statistics over
the B examples, so no layer copies or transposes anything and members never mix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnrepro.choices import STATS_MODES
from bnrepro.models.mlp import ACTIVATIONS, MLP


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


class StackedBatchNorm(nn.BatchNorm1d):
    """BN per member and feature of (M, F, B) activations, as channels of a (1, M*F, B) view."""

    def __init__(self, members: int, features: int, eps: float, momentum: float | None) -> None:
        super().__init__(members * features, eps=eps, momentum=momentum)
        self.members, self.features = members, features

    def forward(self, h: Tensor) -> Tensor:
        return super().forward(h.reshape(1, -1, h.shape[-1])).view_as(h)


class StackedMLP(nn.Module):
    """`members` MLPs of identical shape.

    Input (M, B, in), member i's batch in row i, or (B, in) shared by all members; output
    logits (M, B, classes).
    """

    def __init__(
        self,
        members: int,
        in_features: int = 784,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        activation: str = "sigmoid",
        norm: str = "none",
        dropout: float = 0.0,
        bn: dict | None = None,
    ) -> None:
        super().__init__()
        bn = dict(bn or {})
        stats = bn.get("stats", "ema")
        if stats not in STATS_MODES:
            raise ValueError(f"bn stats must be one of {STATS_MODES}, got {stats!r}")
        self.members = members
        self.layers = nn.ModuleDict()
        width = in_features
        for i, out in enumerate(hidden, start=1):
            block = nn.Sequential()
            block.add_module("linear", StackedLinear(members, width, out, bias=norm == "none"))
            if norm == "bn":
                momentum = None if stats == "cumulative" else bn.get("momentum", 0.1)
                block.add_module(
                    "bn", StackedBatchNorm(members, out, bn.get("eps", 1e-5), momentum)
                )
            block.add_module("act", ACTIVATIONS[activation]())
            if dropout > 0:
                block.add_module("dropout", nn.Dropout(dropout))
            self.layers[f"h{i}"] = block
            width = out
        self.classifier = StackedLinear(members, width, num_classes, bias=True)

    @classmethod
    def from_members(cls, mlps: Sequence[MLP]) -> StackedMLP:
        """Stack already initialised MLPs of one shape, copying their weights and buffers."""
        blocks = list(mlps[0].layers.values())
        bn = blocks[0]._modules.get("bn")
        dropout = blocks[0]._modules.get("dropout")
        activation = next(k for k, v in ACTIVATIONS.items() if isinstance(blocks[0].act, v))
        stacked = cls(
            len(mlps),
            in_features=blocks[0].linear.in_features,
            hidden=[b.linear.out_features for b in blocks],
            num_classes=mlps[0].classifier.out_features,
            activation=activation,
            norm="bn" if bn is not None else "none",
            dropout=dropout.p if dropout is not None else 0.0,
            bn=None
            if bn is None
            else {
                "stats": "ema" if bn.momentum is not None else "cumulative",
                "momentum": bn.momentum,
                "eps": bn.eps,
            },
        )
        with torch.no_grad():
            for i, mlp in enumerate(mlps):
                stacked.load_member(i, mlp)
        return stacked

    def load_member(self, i: int, mlp: MLP) -> None:
        """Copy one plain MLP's parameters and BN buffers into member i."""
        pairs = [(self.classifier, mlp.classifier)]
        pairs += [(self.layers[n].linear, mlp.layers[n].linear) for n in self.layers]
        for stacked, plain in pairs:
            stacked.weight[i].copy_(plain.weight)
            if stacked.bias is not None:
                stacked.bias[i, :, 0].copy_(plain.bias)
        for name, block in self.layers.items():
            if "bn" in block._modules:
                sbn, pbn, f = block.bn, mlp.layers[name].bn, block.bn.features
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    getattr(sbn, attr)[i * f : (i + 1) * f].copy_(getattr(pbn, attr))

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
