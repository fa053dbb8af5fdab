"""The network a checked model config describes: one table from config class to network class.

As pycls's model builders do, the network class comes from the type of `RunConfig.model`, not
from Hydra's `_target_`. The configs keep `_target_` (and `_convert_`) as the model union's tag
in the schema, and because every run directory's hash covers them; it names the same class
as this table (tests/test_structure.py checks that). The network gets the config's settings as
arguments and the run's one `Normalization` (models/norms.py) in place of model.norm, model.bn
and the norm's settings section, so nothing here parses a setting again.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bnrepro.config.schema import NORMS, ConvNetConfig, InceptionConfig, MLPConfig
from bnrepro.models.convnet import ConvNet, StackedConvNet
from bnrepro.models.inception import BNInception
from bnrepro.models.mlp import MLP
from bnrepro.models.norms import Normalization
from bnrepro.models.stacked_inception import StackedBNInception
from bnrepro.models.stacked_mlp import StackedMLP

ModelConfig = MLPConfig | InceptionConfig | ConvNetConfig

NETWORKS: dict[type, type[nn.Module]] = {
    MLPConfig: MLP,
    InceptionConfig: BNInception,
    ConvNetConfig: ConvNet,
}
# Seeds trained side by side in one module (seeds=[...]; the schema allows it on the in-memory
# datasets, whose task serves stacked batches).
STACKED: dict[type, type[nn.Module]] = {
    MLPConfig: StackedMLP,
    InceptionConfig: StackedBNInception,
    ConvNetConfig: StackedConvNet,
}


def network_arguments(model: ModelConfig) -> dict[str, Any]:
    """The model config's settings that are the network's own arguments: all but the tag
    (`_target_`) and what the Normalization carries (model.norm, model.bn, the norms'
    settings sections)."""
    sections = {kind.section for kind in NORMS.values() if kind.section is not None}
    carried = {"target", "norm", "bn", *sections}
    return {name: value for name, value in vars(model).items() if name not in carried}


def build_network(model: ModelConfig, norm: Normalization, members: int | None = None) -> nn.Module:
    """The network of `model` with the run's normalisation `norm`; with `members`, that many
    stacked copies in one module (StackedMLP, StackedBNInception), each drawing its own
    initial weights."""
    if members is None:
        return NETWORKS[type(model)](norm=norm, **network_arguments(model))
    return STACKED[type(model)](members, norm=norm, **network_arguments(model))
