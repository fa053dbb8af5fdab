"""A small convolutional network for the batch-size study (issue 22, experiment/batch_size_conv).

Wu & He 2018 (Group Normalization) compare normalisations on ResNet-50, where every layer has
at least 64 channels, so GroupNorm's G = 32 groups hold 2 or more channels each. The MNIST MLP
(100 units) cannot show that: GroupNorm gets 4 groups there. This network keeps every layer at
32 channels or more, so GroupNorm has its 32 groups, and is small enough to train many arms on
a CPU: 3x3 convolutions, each conv -> [norm] -> activation (BN-Inception's `ConvUnit`), strided
convolutions in place of pooling, a global average pool and a linear classifier.

`StackedConvNet` trains several seeds side by side as one module, as StackedBNInception does
(grouped convolutions, member m's maps in channel block m: models/stacked_inception.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnrepro.models.inception import ConvUnit
from bnrepro.models.norms import Normalization
from bnrepro.models.stacked_inception import MemberStack, StackedClassifier


def conv_stages(
    norm: Normalization,
    activation: str,
    in_channels: int,
    widths: Sequence[int],
    strides: Sequence[int],
    members: int | None,
) -> nn.ModuleDict:
    """conv1..convN, each a ConvUnit (3x3 conv, norm, activation) of its width and stride."""
    stages = nn.ModuleDict()
    width = in_channels
    for i, (out, stride) in enumerate(zip(widths, strides, strict=True), start=1):
        stages[f"conv{i}"] = ConvUnit(
            width, out, 3, stride, activation=activation, norm=norm, members=members
        )
        width = out
    return stages


class ConvNet(nn.Module):
    """Conv units of `widths` channels with `strides`, global average pooling, [dropout] and a
    linear classifier. He-normal convolutions over fan_in, N(0, 0.01) classifier (as
    BNInception), zero biases. With `members` (StackedConvNet), that many side by side."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        norm: Normalization,
        activation: str = "relu",
        dropout: float = 0.0,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 64),
        strides: Sequence[int] = (2, 2, 1),
        members: int | None = None,
    ) -> None:
        super().__init__()
        self.normalization, self.activation = norm, activation
        self.stages = conv_stages(norm, activation, in_channels, widths, strides, members)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = (
            nn.Linear(widths[-1], num_classes)
            if members is None
            else StackedClassifier(members, widths[-1], num_classes)
        )
        self.reset_parameters(members or 1)

    @torch.no_grad()
    def reset_parameters(self, members: int = 1) -> None:
        """He-normal convolutions over each member's own fan_in, N(0, 0.01) classifier, zero
        biases; norms keep their own initialisation (gamma 1, beta 0)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                for block in module.weight.chunk(members):
                    nn.init.kaiming_normal_(block, mode="fan_in", nonlinearity=self.activation)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def nonlinearities(self) -> dict[str, nn.Module]:
        """Every conv unit's activation module, by stage name (conv1, conv2, ...)."""
        return {name: unit.act for name, unit in self.stages.items()}

    def forward(self, x: Tensor) -> Tensor:
        for unit in self.stages.values():
            x = unit(x)
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


class StackedConvNet(MemberStack, ConvNet):
    """`members` ConvNets of identical shape as one module (models/stacked_inception.py says
    how): input (M, B, C, H, W) or one (B, C, H, W) batch for all; logits (M, B, classes).
    Activations are channels_last, as StackedBNInception's (oneDNN's grouped convolutions are
    faster so on CPU)."""

    def __init__(
        self, members: int, num_classes: int = 10, *, channels_last: bool = True, **kwargs: Any
    ) -> None:
        ConvNet.__init__(self, num_classes, members=members, **kwargs)
        self.members = members
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: Tensor) -> Tensor:
        return ConvNet.forward(self, self.member_channels(x))
