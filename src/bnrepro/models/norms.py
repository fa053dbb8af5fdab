"""What normalises a layer before its nonlinearity: the config's `model.norm` and its settings.

`Normalization` is built once per network from the model's config and makes the layers that
sit between each linear map (or convolution) and its nonlinearity, for plain networks and
for the stacked MLP (models/stacked_mlp.py):

- ``none``: nothing (the linear map keeps its bias).
- ``bn``: the paper's BN (models/batchnorm.py), module name ``bn``.
- ``noisy_bn``: BN, then `ActivationNoise`: Santurkar et al. 2018's "noisy BN", whose output
  distribution moves at every step (module names ``bn``, ``noise``).
- ``batch_renorm``: Batch Renormalization (Ioffe 2017, models/batch_renorm.py), ``norm``.
- ``group_norm``: torch's GroupNorm (Wu & He 2018), gcd(C, groups) groups, ``norm``.
- ``layer_norm``: torch's LayerNorm over a layer's features (``norm``); for convolutions
  torch's GroupNorm with one group, which is LayerNorm over (C, H, W) with per-channel gamma
  and beta (Wu & He's definition; ``nn.LayerNorm`` would need H and W when built).

Every norm but ``none`` has a beta, which replaces the linear map's bias (Section 3.2).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnrepro.config.schema import (
    NORM_SECTIONS,
    GroupNormSettings,
    NoiseSettings,
    RenormSettings,
    parse,
)
from bnrepro.models.batch_renorm import BatchRenorm, StackedBatchRenorm
from bnrepro.models.batchnorm import BNStats, network_bn


class ActivationNoise(nn.Module):
    """Noise after BN that changes its output distribution at every training step.

    At each training forward, per unit j (per member and unit for stacked (M, F, B) input):
    a scale s_j ~ U(scale), a mean m_j ~ U(-mean, mean), a spread v_j ~ U(0, std); each
    activation z becomes s_j z + m_j + v_j n with n ~ N(0, 1) drawn per example. The unit's
    output then has a non-zero mean and a non-unit variance that differ from step to step,
    which is what Santurkar et al. use to destroy BN's distributional stability. Identity in
    evaluation mode. `hold` reuses the last draw (the ICS measurement evaluates one step's
    loss several times, bnrepro/measures/ics.py).
    """

    def __init__(self, settings: NoiseSettings, stacked: bool = False) -> None:
        super().__init__()
        self.settings, self.stacked = settings, stacked
        self.hold = False
        self._last: tuple[Tensor, Tensor] | None = None

    def forward(self, z: Tensor) -> Tensor:
        if not self.training:
            return z
        if not (self.hold and self._last is not None and self._last[1].shape == z.shape):
            self._last = self._draw(z)
        scale, shift = self._last
        return z * scale + shift

    def _draw(self, z: Tensor) -> tuple[Tensor, Tensor]:
        # Per-unit shape: every example dimension set to 1 (stacked: (M, F, 1)).
        examples = [1] * (z.dim() - 2)
        unit_shape = (*z.shape[:2], 1) if self.stacked else (1, z.shape[1], *examples)
        low, high = self.settings.scale

        def uniform(a: float, b: float) -> Tensor:
            return torch.empty(unit_shape, device=z.device, dtype=z.dtype).uniform_(a, b)

        scale = uniform(low, high)
        mean = uniform(-self.settings.mean, self.settings.mean)
        spread = uniform(0.0, self.settings.std)
        return scale, mean + spread * torch.randn_like(z)

    def extra_repr(self) -> str:
        s = self.settings
        return f"scale={list(s.scale)}, mean=±{s.mean}, std<={s.std}, stacked={self.stacked}"


@contextlib.contextmanager
def held_noise(model: nn.Module) -> Iterator[None]:
    """Within the block, every ActivationNoise of `model` reuses its last draw."""
    noises = [m for m in model.modules() if isinstance(m, ActivationNoise)]
    for m in noises:
        m.hold = True
    try:
        yield
    finally:
        for m in noises:
            m.hold = False


class StackedGroupNorm(nn.Module):
    """GroupNorm (or LayerNorm: groups=None) per member of (M, F, B) activations.

    torch's group_norm / layer_norm normalise each example's features; each member then applies
    its own gamma and beta, stored member-major like StackedBatchNorm's: member i's are
    entries i*F .. (i+1)*F - 1.
    """

    def __init__(self, members: int, features: int, groups: int | None, eps: float) -> None:
        super().__init__()
        self.members, self.features, self.groups, self.eps = members, features, groups, eps
        self.weight = nn.Parameter(torch.ones(members * features))
        self.bias = nn.Parameter(torch.zeros(members * features))

    def forward(self, h: Tensor) -> Tensor:
        members, features, batch = h.shape
        rows = h.transpose(1, 2)  # (M, B, F): each example's features in the last dim
        if self.groups is None:
            z = F.layer_norm(rows, (features,), eps=self.eps)
        else:
            flat = rows.reshape(members * batch, features)
            z = F.group_norm(flat, self.groups, eps=self.eps).view(members, batch, features)
        z = z.transpose(1, 2)
        return z * self.weight.view(members, features, 1) + self.bias.view(members, features, 1)

    def extra_repr(self) -> str:
        return f"members={self.members}, features={self.features}, groups={self.groups}"


def groups_for(channels: int, groups: int) -> int:
    """GroupNorm's group count for a layer of `channels`: gcd(channels, groups), so every width
    of a scaled network divides (Wu & He's G = 32 gives 32 groups for 64 channels, 4 for 100)."""
    return math.gcd(channels, groups)


@dataclass(frozen=True)
class Normalization:
    """A network's normalisation: the kind (model.norm) and the settings it needs, checked."""

    kind: str
    bn: BNStats | None = None  # the BN layers' inference statistics (bn, noisy_bn)
    renorm: RenormSettings | None = None
    group_norm: GroupNormSettings | None = None
    noise: NoiseSettings | None = None
    layer_norm_eps: float = 1e-5  # torch's default

    @classmethod
    def from_config(
        cls,
        norm: str,
        bn: Mapping[str, Any] | BNStats | None = None,
        renorm: Mapping[str, Any] | RenormSettings | None = None,
        group_norm: Mapping[str, Any] | GroupNormSettings | None = None,
        noise: Mapping[str, Any] | NoiseSettings | None = None,
    ) -> Normalization:
        """From the model config's keys; ValueError when `norm` lacks its settings."""
        sections = {
            "renorm": (renorm, RenormSettings),
            "group_norm": (group_norm, GroupNormSettings),
            "noise": (noise, NoiseSettings),
        }
        parsed = {
            name: value if value is None or isinstance(value, kind) else parse(kind, value, name)
            for name, (value, kind) in sections.items()
        }
        needed = NORM_SECTIONS.get(norm)
        if needed not in (None, "bn") and parsed[needed] is None:
            raise ValueError(f"norm={norm!r} needs the settings `{needed}` (model.{needed})")
        return cls(kind=norm, bn=network_bn(norm, bn), **parsed)

    @property
    def has_beta(self) -> bool:
        """Whether the layers end in a learnt shift, which replaces the linear map's bias."""
        return self.kind != "none"

    def layers(self, features: int, dims: int = 1) -> dict[str, nn.Module]:
        """The modules between a linear map (dims=1, (N, C) input) or a convolution (dims=2,
        (N, C, H, W)) and its nonlinearity, by module name, in order."""
        kind = self.kind
        if kind == "none":
            return {}
        if kind in ("bn", "noisy_bn"):
            out: dict[str, nn.Module] = {"bn": self.bn.layer(features, dims)}
            if kind == "noisy_bn":
                out["noise"] = ActivationNoise(self.noise)
            return out
        if kind == "batch_renorm":
            return {"norm": BatchRenorm(features, **vars(self.renorm))}
        if kind == "group_norm":
            groups = groups_for(features, self.group_norm.groups)
            return {"norm": nn.GroupNorm(groups, features, eps=self.group_norm.eps)}
        if kind == "layer_norm":
            if dims == 1:
                return {"norm": nn.LayerNorm(features, eps=self.layer_norm_eps)}
            return {"norm": nn.GroupNorm(1, features, eps=self.layer_norm_eps)}
        raise ValueError(f"unknown norm {kind!r}")

    def stacked_layers(self, members: int, features: int) -> dict[str, nn.Module]:
        """The same modules for `members` stacked MLPs' feature-major (M, F, B) activations."""
        from bnrepro.models.stacked_mlp import StackedBatchNorm  # stacked_mlp imports us

        kind = self.kind
        if kind == "none":
            return {}
        if kind in ("bn", "noisy_bn"):
            bn = StackedBatchNorm(
                members, features, eps=self.bn.eps, momentum=self.bn.layer_momentum
            )
            out: dict[str, nn.Module] = {"bn": bn}
            if kind == "noisy_bn":
                out["noise"] = ActivationNoise(self.noise, stacked=True)
            return out
        if kind == "batch_renorm":
            return {"norm": StackedBatchRenorm(members, features, **vars(self.renorm))}
        if kind == "group_norm":
            groups = groups_for(features, self.group_norm.groups)
            return {"norm": StackedGroupNorm(members, features, groups, self.group_norm.eps)}
        if kind == "layer_norm":
            return {"norm": StackedGroupNorm(members, features, None, self.layer_norm_eps)}
        raise ValueError(f"unknown norm {kind!r}")


# The modules whose gamma and beta take optim.norm_weight_decay (optim.py), besides torch's.
NORM_CLASSES = (BatchRenorm, StackedGroupNorm)
