"""Several BN-Inceptions trained side by side as one module: seeds=[...] for the conv net.

Member m of a StackedBNInception computes exactly what a `BNInception` with member m's weights
computes; the members share nothing but the kernels. Activations are (B, M*C, H, W), member
m's maps in channel block m, so every op of the network is one op for all members:

- each convolution is a grouped one (member m is group m: `ConvUnit(members=M)`);
- BN over the M*C channels is each member's own BN (statistics per channel over the batch
  and positions), and every other norm has its grouped layers too
  (`Normalization.member_layers`: GroupNorm with M times a member's groups, ...);
- pools, activations and dropout act per channel or per element anyway; LRN, which mixes
  neighbouring channels, runs on the (B*M, C, H, W) view (`MemberLRN`);
- an Inception module concatenates its branches within each member ((B, M, C_branch, H, W)
  views joined on dim 2);
- the classifier is one batched matrix product, giving (M, B, classes) logits as StackedMLP.

The input is (M, B, C, H, W), member m's batch in row m (the MNIST task's stacked batches),
or one (B, C, H, W) batch for every member (evaluation, probes).

Why grouped convolutions and not torch.func's model ensembling (`stack_module_state` +
`vmap` over plain BNInceptions): vmap keeps BN's running statistics when they are stacked too
(in-place updates of batched buffers work), and turns each convolution into a grouped one
itself, but adds its own dispatch to every op and keeps NCHW: 2.2x slower per model-step
than this module at 8 seeds on 1 CPU thread (scripts/bench_conv.py --vmap: 62 against 28 ms),
and the trainer's module-based parts (probes' hooks, Algorithm 2 and the BN-statistics probe
on the BN modules, the optimizer's norm parameter groups, checkpoints) would all need a
functional path of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bnrepro.models.inception import (
    INCEPTION_TABLE,
    BNInception,
    inception_stages,
    probed_activations,
)
from bnrepro.models.norms import Normalization


class StackedClassifier(nn.Module):
    """`members` Linear layers on (B, M*C) pooled features -> (M, B, classes) logits; member
    m's weight is weight[m] (classes, C), as nn.Linear's."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(members, out_features))

    def forward(self, h: Tensor) -> Tensor:
        members, _, in_features = self.weight.shape
        per_member = h.view(h.shape[0], members, in_features).transpose(0, 1)  # (M, B, C)
        return torch.baddbmm(self.bias.unsqueeze(1), per_member, self.weight.transpose(1, 2))


class MemberStack(nn.Module):
    """What a stack of conv nets on (B, M*C, H, W) activations shares (StackedBNInception,
    models/convnet.StackedConvNet): member m's maps in channel block m, its classifier row m.
    Subclasses set `members`, `memory_format`, `normalization`, `activation` and `dropout`
    as their plain network does."""

    members: int
    memory_format: torch.memory_format

    @torch.no_grad()
    def load_member(self, i: int, network: nn.Module) -> None:
        """Copy one plain network's parameters and buffers into member i
        (`member_state_dict` says where each goes).

        The network must have been built from the same arguments: its module names, norm,
        activation, dropout and every tensor's shape are checked (ValueError).
        """
        mismatch = ValueError(
            f"member {i}: the {type(network).__name__} was built with other arguments than "
            f"the stack"
        )
        if (
            network.normalization != self.normalization
            or network.activation != self.activation
            or _module_names(network) != _module_names(self)
            or getattr(network.dropout, "p", 0.0) != getattr(self.dropout, "p", 0.0)
        ):
            raise mismatch
        plain, member = network.state_dict(), self.member_state_dict(i)
        if plain.keys() != member.keys():
            raise mismatch
        if any(plain[name].shape != target.shape for name, target in member.items()):
            raise mismatch  # copy_ would broadcast some of these
        for name, target in member.items():
            target.copy_(plain[name])

    def member_state_dict(self, i: int) -> dict[str, Tensor]:
        """Member i's parameters and buffers under the plain network's names, as views into the
        stack (a plain network built from the same arguments loads them as its own).

        Member i's part of a convolution's or norm's tensor is its block i along dim 0
        (channels i*C .. (i+1)*C - 1), of the classifier's its row i; counters (BN's batches
        tracked, the same for every member) are shared.
        """
        views = {}
        for name, tensor in self.state_dict().items():
            if name.startswith("classifier."):
                views[name] = tensor[i]
            elif tensor.dim() == 0:
                views[name] = tensor
            else:
                views[name] = tensor.chunk(self.members)[i]
        return views

    def member_channels(self, x: Tensor) -> Tensor:
        """(M, B, C, H, W) -> (B, M*C, H, W), member m's images in channel block m, in the
        network's memory format; a (B, C, H, W) batch for every member is repeated into each
        block."""
        if x.dim() == 4:
            return x.repeat(1, self.members, 1, 1).contiguous(memory_format=self.memory_format)
        members, batch, channels, height, width = x.shape
        # One copy each, by contiguous() and not reshape: with C = 1, reshape would merge the
        # member dim into a strided view, which every op after would read in the slow layout.
        if self.memory_format == torch.channels_last:
            nhwc = x.permute(1, 3, 4, 0, 2).contiguous()  # (B, H, W, M, C)
            return nhwc.view(batch, height, width, members * channels).permute(0, 3, 1, 2)
        return x.transpose(0, 1).contiguous().view(batch, members * channels, height, width)


class StackedBNInception(MemberStack):
    """`members` BN-Inceptions of identical shape, built from BNInception's own arguments.

    A fresh StackedBNInception draws each member's weights as BNInception would (He-normal
    convolutions with each member's own fan, a N(0, 0.01) classifier), from one stream;
    `load_member` copies in a BNInception's, so member i can start exactly where its plain
    run would (training/run.build_model does), and `member_state_dict` gives member i back.

    `channels_last` (the default) keeps the activations NHWC: on this CPU oneDNN's grouped
    convolutions and torch's pools are much faster so (pools up to 10x), 1.8-1.9x per step
    (scripts/bench_conv.py --nchw). PyTorch's CPU BN kernel for NHWC input sums in float,
    which puts a relative error of about 1e-4 on a batch variance over 25k values (1e-7 for
    NCHW): far below the mini-batch's own sampling noise (about sqrt(2/n), 1e-2), but larger
    than float rounding, so members match their plain networks to about 1e-4 then, and to
    float rounding with channels_last=False.
    """

    def __init__(
        self,
        members: int,
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
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.members = members
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.normalization = norm
        self.activation = activation
        self.init_mode = init_mode
        self.in_channels = in_channels
        # The layers' norm is made before the data arrive: a norm that cannot stack fails here.
        self.stages, width = inception_stages(
            norm, activation, lrn, proj_4cd, in_channels, stem, width_mult, modules, members
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = StackedClassifier(members, width, num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BNInception.reset_parameters for each member: He-normal convolutions from each
        member's own (C_out, C_in, k, k) block, N(0, 0.01) classifier, zero biases, BN gamma 1
        and beta 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                for block in module.weight.chunk(self.members):  # views: fan of one member
                    nn.init.kaiming_normal_(
                        block, mode=self.init_mode, nonlinearity=self.activation
                    )
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    @classmethod
    def from_members(cls, networks: Sequence[BNInception], **kwargs: object) -> StackedBNInception:
        """Stack initialised BNInceptions built with `kwargs` (BNInception's arguments),
        copying their weights and buffers."""
        stacked = cls(len(networks), **kwargs)
        for i, network in enumerate(networks):
            stacked.load_member(i, network)
        return stacked

    def nonlinearities(self) -> dict[str, nn.Module]:
        """BNInception's five probed activation modules, by stage name; their inputs are
        (B, M*C, H, W), member m's maps in channel block m (measures/probes.unit_values)."""
        return probed_activations(self.stages)

    def forward(self, x: Tensor) -> Tensor:
        x = self.member_channels(x)
        for stage in self.stages.values():
            x = stage(x)
        x = torch.flatten(self.pool(x), 1)  # (B, M*C)
        return self.classifier(self.dropout(x))  # (M, B, classes)


def _module_names(model: nn.Module) -> list[str]:
    """Every submodule's name: the structure `load_member` cannot see in the tensors' shapes
    (LRN, dropout and activations have none)."""
    return [name for name, _ in model.named_modules()]
