"""BN-Inception: the ImageNet network of Section 4.2 ("Inception v2"), per the appendix table.

The layout follows the paper's appendix (Figure 5): a stem (conv 7x7/2, max pool, conv 1x1,
conv 3x3, max pool), ten Inception modules 3a..5b, global average pooling and a linear
classifier. Relative to the original GoogLeNet (Section 4.2): the 5x5 convolutions are
replaced by two stacked 3x3 convolutions, 3c and 4e reduce the resolution themselves (stride-2
3x3 convolutions alongside a pass-through max pool), pooling inside the modules is average or
max as the table says, and with BN every convolution is followed by BN before its nonlinearity.

Choices the paper leaves open, or gets wrong:

- The pool-projection width of 4c and 4d (`proj_4cd`). The table prints "avg + 128" for both,
  but also prints 576 output channels; 160+160+160+128 = 608 for 4c and 96+192+192+128 = 608
  for 4d, so the two columns contradict each other. The default 96 reproduces the printed
  576 output sizes (and is what TF-slim's inception_v2 uses); 128 is what the Caffe port of
  BN-Inception uses, giving 608 at 4c and 4d and, since 4e passes its input through, 1056
  channels out of 4e and into 5a. Every width is computed from the branch widths, never
  hard-coded, so either choice yields a consistent network.
- The first convolution. The paper's is separable (depth multiplier 8); implementations
  (Caffe port, torchvision-style code) usually use a plain 7x7/2 convolution, as we do.
- Padding. Every stride-2 pool and convolution is padded so that a side of H becomes
  ceil(H / 2), which gives the table's 112, 56, 28, 14, 7 for 224x224 inputs and keeps the
  branches of the stride-2 modules the same size for any input (odd sides included). With
  global average pooling instead of the table's 7x7 one, reduced inputs (down to 32x32 and
  below) run as well.
- Average pooling inside the modules ignores the zero padding at the borders
  (`count_include_pad=False`, as TF's 'SAME' pooling does).
- Size. The paper states 13.6 M parameters, but the table's widths give only 10.15 M conv
  weights; with BN and a 1000-way classifier we count 11.19 M (proj_4cd=96) or 11.29 M (128),
  about 17-18 % below. No auxiliary classifiers are built (the table lists none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnrepro.models.mlp import ACTIVATIONS
from bnrepro.models.norms import Normalization

# The appendix table, one row per Inception module: #1x1, #3x3 reduce, #3x3, double #3x3
# reduce, double #3x3, pool type, pool projection (0 = pass through), stride. 4c and 4d's
# projection (None here) is the `proj_4cd` argument (see the module docstring).
INCEPTION_TABLE: dict[str, tuple[int, int, int, int, int, str, int | None, int]] = {
    "3a": (64, 64, 64, 64, 96, "avg", 32, 1),
    "3b": (64, 64, 96, 64, 96, "avg", 64, 1),
    "3c": (0, 128, 160, 64, 96, "max", 0, 2),
    "4a": (224, 64, 96, 96, 128, "avg", 128, 1),
    "4b": (192, 96, 128, 96, 128, "avg", 128, 1),
    "4c": (160, 128, 160, 128, 160, "avg", None, 1),
    "4d": (96, 128, 192, 160, 192, "avg", None, 1),
    "4e": (0, 128, 192, 192, 256, "max", 0, 2),
    "5a": (352, 192, 320, 160, 224, "avg", 128, 1),
    "5b": (352, 192, 320, 192, 224, "max", 128, 1),
}


def _max_pool_3x3_s2() -> nn.MaxPool2d:
    """Max pool 3x3/2 whose output side is ceil(H / 2), like a padded stride-2 3x3 conv.

    Padding 1 (the padding is -inf, so it never wins the max) rather than ceil_mode: the
    sizes agree with the stride-2 convolutions for every H, and an input smaller than the
    window cannot make the output empty.
    """
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


class ConvUnit(nn.Sequential):
    """Conv -> [norm] -> activation, the building block of the whole network.

    With a normalisation (BN, or another `model.norm`: models/norms.py) the convolution has no
    bias, the norm's beta replaces it, and the norm sits right before the nonlinearity; BN
    normalises each feature map over the batch and all positions (Section 3.2). The activation
    is its own module (`act`) so that probes can hook its input.

    With `members` (StackedBNInception, models/stacked_inception.py) the unit is that many
    units side by side on (B, M*C, H, W) activations, member m's maps in channel block m: a
    grouped convolution (member m is group m) and the norm's stacked layers
    (`Normalization.member_layers`). `in_channels` and `out_channels` are per member.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        activation: str,
        norm: Normalization,
        members: int | None = None,
    ) -> None:
        super().__init__()
        groups = members or 1
        self.conv = nn.Conv2d(
            groups * in_channels,
            groups * out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=not norm.has_beta,
            groups=groups,
        )
        layers = (
            norm.layers(out_channels, dims=2)
            if members is None
            else norm.member_layers(members, out_channels)
        )
        for name, module in layers.items():
            self.add_module(name, module)
        self.act = ACTIVATIONS[activation]()
        self.out_channels = out_channels


class InceptionModule(nn.Module):
    """One row of the appendix table: up to four parallel branches concatenated on channels.

    Branches: 1x1; 3x3 reduce -> 3x3; double 3x3 reduce -> 3x3 -> 3x3 (which replaces the
    original Inception's 5x5); pool -> 1x1 projection. A stride-2 module (3c, 4e) has no 1x1
    branch, its 3x3 and the second 3x3 of the double branch have stride 2, and its pool branch
    is a 3x3/2 max pool passed through without projection.

    With `members`, that many modules side by side (see ConvUnit): every width is per member,
    pools act per channel anyway, and the branches are concatenated within each member.
    """

    def __init__(
        self,
        in_channels: int,
        n1x1: int,
        n3x3_reduce: int,
        n3x3: int,
        n_double_reduce: int,
        n_double: int,
        pool: str,
        proj: int,
        stride: int = 1,
        *,
        activation: str,
        norm: Normalization,
        members: int | None = None,
    ) -> None:
        super().__init__()
        if stride == 2 and (n1x1 or proj):
            raise ValueError("stride-2 modules have no 1x1 branch and pass the pool through")
        self.members = members
        unit = {"activation": activation, "norm": norm, "members": members}
        self.branch1x1 = ConvUnit(in_channels, n1x1, 1, **unit) if n1x1 else None
        self.branch3x3 = nn.Sequential()
        self.branch3x3.add_module("reduce", ConvUnit(in_channels, n3x3_reduce, 1, **unit))
        self.branch3x3.add_module("conv", ConvUnit(n3x3_reduce, n3x3, 3, stride, **unit))
        self.branch_double = nn.Sequential()
        self.branch_double.add_module("reduce", ConvUnit(in_channels, n_double_reduce, 1, **unit))
        self.branch_double.add_module("conv_a", ConvUnit(n_double_reduce, n_double, 3, **unit))
        self.branch_double.add_module("conv_b", ConvUnit(n_double, n_double, 3, stride, **unit))
        self.branch_pool = nn.Sequential()
        if stride == 2:
            self.branch_pool.add_module("pool", _max_pool_3x3_s2())
        elif pool == "max":
            self.branch_pool.add_module("pool", nn.MaxPool2d(3, stride=1, padding=1))
        elif pool == "avg":
            self.branch_pool.add_module(
                "pool", nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
            )
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        if proj:
            self.branch_pool.add_module("proj", ConvUnit(in_channels, proj, 1, **unit))
        self.out_channels = n1x1 + n3x3 + n_double + (proj or in_channels)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch3x3(x), self.branch_double(x), self.branch_pool(x)]
        if self.branch1x1 is not None:
            branches.insert(0, self.branch1x1(x))
        if self.members is None:
            return torch.cat(branches, dim=1)
        return member_cat(branches, self.members)


def member_cat(branches: Sequence[Tensor], members: int) -> Tensor:
    """Concatenate (B, M*C_i, H, W) tensors on channels within each of `members` channel
    blocks: member m's block of the result is member m's blocks of the inputs, in order.

    The result keeps the inputs' memory format: channels_last inputs are joined as
    (B, H, W, M, C_i) views, so the next convolution gets NHWC without a conversion.
    """
    if _memory_format(branches[0]) != torch.channels_last:
        per_member = [b.unflatten(1, (members, -1)) for b in branches]  # (B, M, C_i, H, W)
        return torch.cat(per_member, dim=2).flatten(1, 2)
    per_member = [b.permute(0, 2, 3, 1).unflatten(3, (members, -1)) for b in branches]
    return torch.cat(per_member, dim=4).flatten(3, 4).permute(0, 3, 1, 2)


def inception_stages(
    norm: Normalization,
    activation: str,
    lrn: bool,
    proj_4cd: int,
    in_channels: int,
    stem: str,
    width_mult: float,
    modules: Sequence[str],
    members: int | None = None,
) -> tuple[nn.ModuleDict, int]:
    """BN-Inception's stages by the table's names (conv1, pool1, conv2_reduce, conv2, pool2,
    3a .. 5b) and the width of the last one (BNInception's arguments); with `members`, that
    many networks side by side (models/stacked_inception.py), widths per member."""
    unit = {"activation": activation, "norm": norm, "members": members}

    def scaled(channels: int) -> int:  # every width times width_mult, at least 1
        return max(1, round(channels * width_mult)) if channels else 0

    stages = nn.ModuleDict()
    # The paper's first convolution is separable (depth multiplier 8); implementations
    # usually use a plain 7x7/2 convolution, and so do we. The small stem (28x28 inputs)
    # has a 3x3/1 first convolution: its two pools give 7x7 maps at 3a (28x28 at 224).
    small = stem == "small"
    stages["conv1"] = ConvUnit(
        in_channels, scaled(64), 3 if small else 7, stride=1 if small else 2, **unit
    )
    stages["pool1"] = nn.Sequential()
    stages["pool1"].add_module("pool", _max_pool_3x3_s2())
    stages["conv2_reduce"] = ConvUnit(scaled(64), scaled(64), 1, **unit)
    stages["conv2"] = ConvUnit(scaled(64), scaled(192), 3, **unit)
    stages["pool2"] = nn.Sequential()
    if lrn:
        # The original GoogLeNet's LRN; Section 4.2.1 removes it from the BN networks. It
        # mixes neighbouring channels, so stacked members each get their own.
        stages["pool1"].add_module("lrn", _lrn() if members is None else MemberLRN(members))
        stages["pool2"].add_module("lrn", _lrn() if members is None else MemberLRN(members))
    stages["pool2"].add_module("pool", _max_pool_3x3_s2())

    width = scaled(192)
    for name in modules:
        n1x1, n3r, n3, ndr, nd, pool, proj, stride = INCEPTION_TABLE[name]
        proj = proj_4cd if proj is None else proj
        branches = [scaled(c) for c in (n1x1, n3r, n3, ndr, nd, proj)]
        module = InceptionModule(width, *branches[:5], pool, branches[5], stride, **unit)
        stages[name] = module
        width = module.out_channels
    return stages, width


def probed_activations(stages: nn.ModuleDict) -> dict[str, nn.Module]:
    """Five activation modules spanning the depth, by stage name.

    conv1 and conv2 (the stem's first and 3x3 convolutions); for the last module of groups
    3, 4 and 5 (3c, 4e, 5b in the full network) the activation of the module's 3x3-reduce
    convolution (the first conv of its 3x3 branch).
    """
    acts = {"conv1": stages["conv1"].act, "conv2": stages["conv2"].act}
    for group in "345":  # the last module of each group: 3c, 4e, 5b in the full network
        built = [name for name in stages if name.startswith(group)]
        if built:
            acts[built[-1]] = stages[built[-1]].branch3x3.reduce.act
    return acts


class BNInception(nn.Module):
    """BN-Inception of Section 4.2 and the appendix: stem, Inception 3a..5b, avg pool, linear.

    `norm` (models/norms.Normalization: model.norm with its settings, built once per run) makes
    the layers between every convolution and its nonlinearity: BN (Section 3.2), nothing for
    the plain Inception baseline with conv biases, or another norm of models/norms.py in BN's
    place; kept as `self.normalization`. `activation="sigmoid"` gives BN-x5-Sigmoid
    (Section 4.2.2). `lrn` and `dropout` restore what Section 4.2.1 removes from the original
    Inception: local response normalisation after the first pool and after the stem's 3x3
    conv, and dropout (40 % originally) before the classifier.

    Stages are kept in `self.stages` under the table's names (conv1, pool1, conv2_reduce,
    conv2, pool2, 3a .. 5b), so `stage_outputs` can report each one.

    Scaled down by config (the full network is the defaults): `in_channels` (1 for grey
    images), `stem="small"` for 28x28 inputs (a 3x3/1 first convolution: 7x7 maps at 3a, 4x4
    at 4a, 2x2 at 5a), `width_mult` times every width of the stem and the table, and
    `modules`, the table's rows to build, in order.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        norm: Normalization,
        activation: str = "relu",
        dropout: float = 0.0,
        lrn: bool = False,
        proj_4cd: int = 96,
        in_channels: int = 3,
        stem: str = "imagenet",
        width_mult: float = 1.0,
        modules: Sequence[str] = tuple(INCEPTION_TABLE),
        init_mode: str = "fan_in",
    ) -> None:
        super().__init__()
        self.normalization = norm
        self.activation = activation
        self.init_mode = init_mode
        self.stages, width = inception_stages(
            norm, activation, lrn, proj_4cd, in_channels, stem, width_mult, modules
        )
        self.pool = nn.AdaptiveAvgPool2d(1)  # the table's 7x7 avg pool, for any input size
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(width, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolutions (`init_mode`, gain of the activation), a small-normal classifier.

        Convolutions: `kaiming_normal_(mode=init_mode)` with the gain of the chosen
        nonlinearity (sqrt 2 for ReLU, 1 for sigmoid). The paper gives no initialisation;
        fan_in (the default) keeps the forward signal of the un-normalised baseline at its
        scale through all ten modules, while fan_out, which preserves the backward signal,
        grows it about 100-fold from conv1 to 5b at width 1/8 (initial losses up to 5 instead
        of ln 10). With BN the scale is irrelevant to the forward pass. Classifier: N(0, 0.01),
        as torchvision's GoogLeNet. Biases 0; BN gamma 1, beta 0 (Section 3: the identity
        transform is representable from the start).
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, mode=self.init_mode, nonlinearity=self.activation
                )
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
                nn.init.zeros_(module.bias)

    def nonlinearities(self) -> dict[str, nn.Module]:
        """Five activation modules spanning the depth, by stage name (`probed_activations`)."""
        return probed_activations(self.stages)

    def stage_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """The output of every stage, in order, keyed by the table's stage names."""
        outputs = {}
        for name, stage in self.stages.items():
            x = stage(x)
            outputs[name] = x
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages.values():
            x = stage(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))


def _lrn() -> nn.LocalResponseNorm:
    """GoogLeNet's local response normalisation (AlexNet's constants, 5 channels)."""
    return nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)


class MemberLRN(nn.LocalResponseNorm):
    """GoogLeNet's LRN (`_lrn`) for each of `members` networks side by side on (B, M*C, H, W)
    activations: applied to the (B*M, C, H, W) view, so no window spans two members."""

    def __init__(self, members: int) -> None:
        super().__init__(size=5, alpha=1e-4, beta=0.75, k=1.0)
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        per_member = x.reshape(batch * self.members, channels // self.members, height, width)
        out = super().forward(per_member).view_as(x)
        return out.contiguous(memory_format=_memory_format(x))  # as it came (channels_last)


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for an NHWC tensor that is not also NCHW, else torch's default."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
