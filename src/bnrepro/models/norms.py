"""What normalises a layer before its nonlinearity: the config's `model.norm` and its settings.

`Normalization` is built once per run from the checked model config (training/run.py) and
handed to the network; it makes the layers that sit between each linear map (or convolution)
and its nonlinearity, for plain networks, for the stacked MLP (models/stacked_mlp.py) and for
the stacked BN-Inception (models/stacked_inception.py), from the table `NORM_LAYERS`:

- ``none``: nothing (the linear map keeps its bias).
- ``bn``: the paper's BN (models/batchnorm.py), module name ``bn``.
- ``noisy_bn``: BN, then `ActivationNoise`: Santurkar et al. 2018's "noisy BN", whose output
  distribution moves at every step (module names ``bn``, ``noise``).
- ``noise``: `ActivationNoise` alone, on the network without BN: their control (``noise``;
  no beta, so the linear map keeps its bias).
- ``batch_renorm``: Batch Renormalization (Ioffe 2017, models/batch_renorm.py), ``norm``.
- ``group_norm``: torch's GroupNorm (Wu & He 2018), gcd(C, groups) groups, ``norm``.
- ``layer_norm``: torch's LayerNorm over a layer's features (``norm``); for convolutions
  torch's GroupNorm with one group, which is LayerNorm over (C, H, W) with per-channel gamma
  and beta (Wu & He's definition; ``nn.LayerNorm`` would need H and W when built).

Every norm but ``none`` and ``noise`` has a beta, which replaces the linear map's bias
(Section 3.2).

Which norms exist, the settings section each reads and which are BN is config.schema.NORMS
(torch-free). A new norm touches four files: configs/norm/<norm>.yaml (model.norm and its
section), config/schema.py (its settings class, its NORMS entry, the section's field on the
model configs), its module under models/, and its NORM_LAYERS entry here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnrepro.config.schema import NORMS, ConvNetConfig, InceptionConfig, MLPConfig, NoiseSettings
from bnrepro.errors import ConfigError
from bnrepro.models.batch_renorm import BatchRenorm, StackedBatchRenorm
from bnrepro.models.batchnorm import BNStats


class ActivationNoise(nn.Module):
    """Santurkar et al.'s "noisy BN" noise (arXiv 1805.11604, Appendix A.2.1, Algorithm 1),
    which makes a unit's output distribution move at every training step.

    At each training forward, per unit j (a feature of (N, F) input, a channel of (N, C, H, W),
    a member's feature of stacked (M, F, B)): a mean mu_j ~ U(-mean, mean) and a scale
    sigma_j ~ U(scale); then per example i, s_ij ~ N(sigma_j, scale_std) and
    m_ij ~ U(mu_j - shift_spread, mu_j + shift_spread), and the activation becomes
    s_ij * z_ij + m_ij (one draw per example and channel for convolutions: a channel is the
    unit BN normalises). Identity in evaluation mode. `hold` reuses the last draw (the ICS
    measurement evaluates one step's loss several times, bnrepro/measures/ics.py).
    """

    def __init__(self, settings: NoiseSettings, stacked: bool = False) -> None:
        super().__init__()
        self.settings, self.stacked = settings, stacked
        self.hold = False
        self._last: tuple[Tensor, Tensor] | None = None

    def forward(self, z: Tensor) -> Tensor:
        if not self.training:
            return z
        if not (self.hold and self._last is not None and self._last[0].shape[:2] == z.shape[:2]):
            self._last = self.draw(z)
        scale, shift = self._last
        return z * scale + shift

    def draw(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(s, m) for a batch like `z`, broadcastable against it: Algorithm 1's draws."""
        spatial = [1] * (z.dim() - 2)  # a channel's positions share their example's draw
        if self.stacked:  # (M, F, B): units (M, F), examples B
            unit_shape, example_shape = (*z.shape[:2], 1), z.shape
        else:  # (N, C, ...): units C, examples N
            unit_shape, example_shape = (1, z.shape[1], *spatial), (*z.shape[:2], *spatial)
        s = self.settings

        def uniform(shape: tuple[int, ...], low: float, high: float) -> Tensor:
            return torch.empty(shape, device=z.device, dtype=z.dtype).uniform_(low, high)

        mu = uniform(unit_shape, -s.mean, s.mean)
        sigma = uniform(unit_shape, *s.scale)
        scale = sigma + s.scale_std * torch.randn(example_shape, device=z.device, dtype=z.dtype)
        offset = uniform(example_shape, -s.shift_spread, s.shift_spread)
        return scale, mu + offset

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"mu~U(±{s.mean}), sigma~U{tuple(s.scale)}, s~N(sigma, {s.scale_std}), "
            f"m~U(mu±{s.shift_spread}), stacked={self.stacked}"
        )


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
    """A network's normalisation, built once per run from the checked model config
    (`from_model`) and handed to the network, which makes its layers with it.

    `kind` is model.norm; `settings` the section it reads besides model.bn (NORMS: model.renorm,
    model.group_norm, model.noise; None for the others); `bn` the BN layers' inference
    statistics (model.bn) for BN's kinds (bn, noisy_bn), None for the others.
    """

    kind: str
    settings: Any = None
    bn: BNStats | None = None
    # Batch Renorm's ghost batches (model.bn.ghost_batch, which BN's own layers read from `bn`).
    ghost_batch: int | None = None

    @classmethod
    def from_model(cls, model: MLPConfig | InceptionConfig | ConvNetConfig) -> Normalization:
        """The normalisation of a checked model config (RunConfig.model): the one place a
        run's model.bn becomes its BNStats."""
        kind = NORMS[model.norm]
        return cls(
            kind=model.norm,
            settings=None if kind.section is None else getattr(model, kind.section),
            bn=BNStats.from_config(model.bn) if kind.is_bn else None,
            ghost_batch=model.bn.ghost_batch if model.norm == "batch_renorm" else None,
        )

    @property
    def has_beta(self) -> bool:
        """Whether the layers end in a learnt shift, which replaces the linear map's bias."""
        return self.kind not in ("none", "noise")

    def layers(self, features: int, dims: int = 1) -> dict[str, nn.Module]:
        """The modules between a linear map (dims=1, (N, C) input) or a convolution (dims=2,
        (N, C, H, W)) and its nonlinearity, by module name, in order."""
        return NORM_LAYERS[self.kind].plain(self, features, dims)

    def stacked_layers(self, members: int, features: int) -> dict[str, nn.Module]:
        """The same modules for `members` stacked MLPs' feature-major (M, F, B) activations."""
        return NORM_LAYERS[self.kind].stacked(self, members, features)

    def member_layers(self, members: int, channels: int) -> dict[str, nn.Module]:
        """The same modules for `members` convolutional networks side by side on
        (B, M*C, H, W) activations, member m's `channels` maps in channel block m
        (models/stacked_inception.py). ConfigError for a norm that has no such layers."""
        grouped = NORM_LAYERS[self.kind].grouped
        if grouped is None:
            raise ConfigError(
                f"model.norm={self.kind} cannot stack BN-Inception members (seeds=[...]); "
                f"run one seed per job instead: -m seed=1,2,3"
            )
        return grouped(self, members, channels)


NO_NORM = Normalization("none")  # nothing between the linear maps and their activations

# (norm, features, dims) -> modules for plain networks; (norm, members, features) for stacked.
LayerMaker = Callable[[Normalization, int, int], dict[str, nn.Module]]


@dataclass(frozen=True)
class NormLayers:
    """One norm kind's modules: `plain(norm, features, dims)` for MLP and BN-Inception,
    `stacked(norm, members, features)` for StackedMLP, whose member i must compute what
    `plain` computes with member i's weights (tests/test_norms.py), and
    `grouped(norm, members, channels)` for StackedBNInception's (B, M*C, H, W) activations,
    whose channel block m must compute what `plain(norm, channels, 2)` computes with member
    m's weights (tests/test_stacked_inception.py); None: the norm cannot stack conv nets."""

    plain: LayerMaker
    stacked: LayerMaker
    grouped: LayerMaker | None = None


# Each kind's makers. layer_norm has no settings section: torch's default eps.
LAYER_NORM_EPS = 1e-5


def _none(norm: Normalization, *shape: int) -> dict[str, nn.Module]:
    return {}


def _bn(norm: Normalization, features: int, dims: int) -> dict[str, nn.Module]:
    return {"bn": norm.bn.layer(features, dims)}


def _stacked_bn(norm: Normalization, members: int, features: int) -> dict[str, nn.Module]:
    return {"bn": norm.bn.stacked_layer(members, features)}


# Norms with per-channel statistics and affine maps (BN, noisy BN, batch renorm) are their
# plain layer over all M*C channels: member m's channels get exactly their own.
def _grouped_per_channel(maker: LayerMaker) -> LayerMaker:
    def grouped(norm: Normalization, members: int, channels: int) -> dict[str, nn.Module]:
        return maker(norm, members * channels, 2)

    return grouped


def _noisy_bn(norm: Normalization, features: int, dims: int) -> dict[str, nn.Module]:
    return _bn(norm, features, dims) | {"noise": ActivationNoise(norm.settings)}


def _stacked_noisy_bn(norm: Normalization, members: int, features: int) -> dict[str, nn.Module]:
    noise = ActivationNoise(norm.settings, stacked=True)
    return _stacked_bn(norm, members, features) | {"noise": noise}


def _noise(norm: Normalization, features: int, dims: int) -> dict[str, nn.Module]:
    return {"noise": ActivationNoise(norm.settings)}


def _stacked_noise(norm: Normalization, members: int, features: int) -> dict[str, nn.Module]:
    return {"noise": ActivationNoise(norm.settings, stacked=True)}


def _batch_renorm(norm: Normalization, features: int, dims: int) -> dict[str, nn.Module]:
    return {"norm": BatchRenorm(features, ghost_batch=norm.ghost_batch, **vars(norm.settings))}


def _stacked_batch_renorm(norm: Normalization, members: int, features: int) -> dict[str, nn.Module]:
    settings = vars(norm.settings)
    return {"norm": StackedBatchRenorm(members, features, ghost_batch=norm.ghost_batch, **settings)}


def _group_norm(norm: Normalization, features: int, dims: int) -> dict[str, nn.Module]:
    groups = groups_for(features, norm.settings.groups)
    return {"norm": nn.GroupNorm(groups, features, eps=norm.settings.eps)}


def _stacked_group_norm(norm: Normalization, members: int, features: int) -> dict[str, nn.Module]:
    groups = groups_for(features, norm.settings.groups)
    return {"norm": StackedGroupNorm(members, features, groups, norm.settings.eps)}


def _layer_norm(norm: Normalization, features: int, dims: int) -> dict[str, nn.Module]:
    if dims == 1:
        return {"norm": nn.LayerNorm(features, eps=LAYER_NORM_EPS)}
    return {"norm": nn.GroupNorm(1, features, eps=LAYER_NORM_EPS)}  # LayerNorm over (C, H, W)


def _stacked_layer_norm(norm: Normalization, members: int, features: int) -> dict[str, nn.Module]:
    return {"norm": StackedGroupNorm(members, features, None, LAYER_NORM_EPS)}


# GroupNorm's groups are consecutive channel blocks: M times a member's groups over M*C
# channels never span two members (a member's LayerNorm, one group, becomes one of M).
def _grouped_group_norm(norm: Normalization, members: int, channels: int) -> dict[str, nn.Module]:
    groups = members * groups_for(channels, norm.settings.groups)
    return {"norm": nn.GroupNorm(groups, members * channels, eps=norm.settings.eps)}


def _grouped_layer_norm(norm: Normalization, members: int, channels: int) -> dict[str, nn.Module]:
    return {"norm": nn.GroupNorm(members, members * channels, eps=LAYER_NORM_EPS)}


# Each `model.norm` kind's layers, plain, stacked and grouped: the torch side of
# config.schema.NORMS, keyed the same (tests/test_norms.py checks that the two agree).
NORM_LAYERS: dict[str, NormLayers] = {
    "none": NormLayers(_none, _none, _none),
    "bn": NormLayers(_bn, _stacked_bn, _grouped_per_channel(_bn)),
    "noisy_bn": NormLayers(_noisy_bn, _stacked_noisy_bn, _grouped_per_channel(_noisy_bn)),
    "noise": NormLayers(_noise, _stacked_noise, _grouped_per_channel(_noise)),
    "batch_renorm": NormLayers(
        _batch_renorm, _stacked_batch_renorm, _grouped_per_channel(_batch_renorm)
    ),
    "group_norm": NormLayers(_group_norm, _stacked_group_norm, _grouped_group_norm),
    "layer_norm": NormLayers(_layer_norm, _stacked_layer_norm, _grouped_layer_norm),
}

# The modules whose gamma and beta take optim.norm_weight_decay (optim.py), besides torch's.
NORM_CLASSES = (BatchRenorm, StackedGroupNorm)
