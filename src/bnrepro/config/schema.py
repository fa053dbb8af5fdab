"""The config's typed schema: what each key may hold, checked once, read as one object.

Hydra composes the YAML in configs/ (where the values and their paper citations live);
`parse_config` checks the composed config against the dataclasses below and returns one
frozen `RunConfig`, which is what the code reads (`cfg.trainer.steps`, `cfg.model.bn.stats`).
pydantic validates it: each field's type says what it may hold (strict: `true` is not an
integer; a number's range, a list's length); a value of the wrong type or out of range, a
missing key or a misspelt one is one line (ConfigError) before any data is read or any file
written. The models, tasks and loop do not check their settings again. The choices (activation,
norm, BN statistics ...) are the `Literal` types here, and nowhere else.

The composed DictConfig stays the config as data: `RunConfig.source` is what is hashed for the
run directory, saved beside each run and sent to W&B.

This module imports no torch: the launching process checks a command line with it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NamedTuple, TypeVar, get_args, get_type_hints

from omegaconf import DictConfig, OmegaConf
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from bnrepro.errors import ConfigError

Activation = Literal["sigmoid", "relu"]
StatsMode = Literal["ema", "cumulative", "population"]  # BN inference statistics (batchnorm.py)
Device = Literal["auto", "cpu", "cuda"]
DistBN = Literal["reduce", "broadcast"]  # BN running statistics across ranks (distributed.py)
# Where ImageNet training JPEGs are decoded and augmented: PIL in the DataLoader workers, or the
# run's device on whole batches (the workers only read bytes); auto = device on CUDA.
Decode = Literal["auto", "workers", "device"]
# The rows of BN-Inception's appendix table (models/inception.INCEPTION_TABLE), in order.
InceptionModule = Literal["3a", "3b", "3c", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
_MODULES = get_args(InceptionModule)
# pydantic's literals are lax (1 would be True): a strict bool beside "auto".
CudaGraph = Literal["auto"] | StrictBool


class NormKind(NamedTuple):
    """What the config knows of one `model.norm` choice, without torch (its layers are
    models/norms.NORM_LAYERS's entry of the same name)."""

    section: str | None  # the model.* settings it needs besides model.norm and model.bn
    is_bn: bool  # its layers are BN's, with inference statistics from model.bn (batchnorm.py)


# What normalises each layer before its nonlinearity (models/norms.py): the paper's BN, none,
# and the alternatives of later work (issue 13): Batch Renormalization (Ioffe 2017), GroupNorm
# (Wu & He 2018), LayerNorm, and BN followed by noise that shifts its output distribution at
# every step (Santurkar et al. 2018), and that noise alone. Each norm's
# configs/norm/<norm>.yaml sets model.norm and its section together. The one place that says
# which norms exist, and which are BN.
NORMS: dict[str, NormKind] = {
    "none": NormKind(section=None, is_bn=False),
    "bn": NormKind(section=None, is_bn=True),  # model.bn, which every model config has
    "batch_renorm": NormKind(section="renorm", is_bn=False),
    "group_norm": NormKind(section="group_norm", is_bn=False),
    "layer_norm": NormKind(section=None, is_bn=False),
    "noisy_bn": NormKind(section="noise", is_bn=True),
    # Santurkar et al.'s control: the same noise on the network without BN.
    "noise": NormKind(section="noise", is_bn=False),
}
Norm = Literal[tuple(NORMS)]  # the choices, from NORMS


def is_bn(norm: str) -> bool:
    """Whether `norm`'s layers are BN's, whose inference statistics come from model.bn."""
    return NORMS[norm].is_bn


def choices(kind: Any) -> tuple[Any, ...]:
    """The values of a Literal type: choices(Activation) == ("sigmoid", "relu")."""
    return get_args(kind)


def expect(expected: str) -> WrapValidator:
    """Whatever fails in the type it annotates (its type, a Field's bounds, an `ok` check),
    the error says the value must be `expected`: the setting's own words, and the whole list
    rather than its one bad item."""
    return WrapValidator(functools.partial(_expecting, expected))


def _expecting(expected: str, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """pydantic's validation of `value` (`handler`), any failure one error saying `expected`."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(
            "invalid", "expected {expected}", {"expected": expected}
        ) from None


def ok(check: Callable[[Any], bool]) -> AfterValidator:
    """A check pydantic has no constraint for (a [low, high] pair in order, distinct seeds)."""

    def validate(value: Any) -> Any:
        if not check(value):
            raise ValueError("fails its check")
        return value

    return AfterValidator(validate)


# Strict numbers (an int is a float's value, and becomes a float; true is neither).
PositiveInt = Annotated[StrictInt, Field(gt=0), expect("a positive integer")]
NonNegativeInt = Annotated[StrictInt, Field(ge=0), expect("an integer >= 0")]
# Two classes at least; two examples at least, for BN in training mode to have a variance.
AtLeastTwo = Annotated[StrictInt, Field(ge=2), expect("an integer >= 2")]
PositiveFloat = Annotated[StrictFloat, Field(gt=0), expect("a positive number")]
NonNegativeFloat = Annotated[StrictFloat, Field(ge=0), expect("a number >= 0")]
# Dropout and SGD's momentum; decay and EMA factors.
Fraction = Annotated[StrictFloat, Field(ge=0, lt=1), expect("a number in [0, 1)")]
Rate = Annotated[StrictFloat, Field(gt=0, le=1), expect("a number in (0, 1]")]
Pair = tuple[StrictFloat, StrictFloat]  # [low, high]: a list in the YAML


class _Section:
    """What every section of the schema shares: how pydantic reads it from a mapping.

    Strictness is in the fields' types (StrictInt ...), not `ConfigDict(strict=True)`: strict
    pydantic takes only an instance, never a mapping, for a dataclass. Unknown keys are refused
    below rather than by `extra="forbid"`, whose error cannot name the section's settings."""

    @model_validator(mode="before")
    @classmethod
    def _settings_only(cls, node: Any) -> Any:
        """The section's settings; other keys starting with `_` (Hydra's `_convert_`) are not
        settings and are dropped, any other key is refused, naming the known ones."""
        if not isinstance(node, Mapping):
            return node  # pydantic says a mapping was expected
        keys = _keys(cls)
        unknown = sorted((k for k in node if k not in keys and not str(k).startswith("_")), key=str)
        if unknown:
            raise PydanticCustomError(
                "not_a_setting",
                "{key} is not a setting",
                {"key": unknown[0], "settings": ", ".join(keys)},
            )
        return {k: v for k, v in node.items() if k in keys}


@functools.cache
def _keys(kind: type) -> tuple[str, ...]:
    """The config's key of each field of `kind`: its alias (`_target_`), else its name."""
    hints = get_type_hints(kind, include_extras=True)
    aliases = {
        f.name: m.alias
        for f in dataclasses.fields(kind)
        for m in getattr(hints[f.name], "__metadata__", ())
        if isinstance(m, FieldInfo) and m.alias
    }
    return tuple(aliases.get(f.name, f.name) for f in dataclasses.fields(kind))


@dataclass(frozen=True, kw_only=True)
class BNSettings(_Section):
    """model.bn: how BN's inference statistics are obtained (models/batchnorm.BNStats)."""

    stats: StatsMode
    momentum: StrictFloat  # torch's EMA momentum (ema; population trains with it, then drops it)
    eps: PositiveFloat
    population_batches: PositiveInt  # K of Algorithm 2
    # Examples per ghost batch: in training, BN (and Batch Renorm, norm=batch_renorm) normalises
    # each consecutive group of this many examples on its own (Hoffer et al. 2017; Ioffe 2017,
    # Section 4.2). Not in any config of
    # configs/model or configs/norm: absent means the whole batch, and an absent key leaves
    # every run's hash as it was; experiments add it (+model.bn.ghost_batch=4).
    ghost_batch: Annotated[StrictInt, Field(ge=2), expect("null or an integer >= 2")] | None = None


@dataclass(frozen=True, kw_only=True)
class RenormSettings(_Section):
    """model.renorm (norm=batch_renorm): Algorithm 1 of Ioffe 2017 (models/batch_renorm.py)."""

    r_max: Annotated[StrictFloat, Field(ge=1), expect("a number >= 1")]
    d_max: NonNegativeFloat
    warmup_steps: NonNegativeInt  # r = 1, d = 0: plain BN
    r_max_steps: NonNegativeInt  # r_max reached at this step
    d_max_steps: NonNegativeInt  # d_max reached at this step
    momentum: Rate  # the paper's alpha
    eps: PositiveFloat


@dataclass(frozen=True, kw_only=True)
class GroupNormSettings(_Section):
    """model.group_norm (norm=group_norm): a layer of C channels gets gcd(C, groups) groups."""

    groups: PositiveInt
    eps: PositiveFloat


@dataclass(frozen=True, kw_only=True)
class NoiseSettings(_Section):
    """model.noise (norm=noisy_bn or noise): Algorithm 1 of Santurkar et al. 2018 (Appendix
    A.2.1; models/norms.ActivationNoise). Per unit and step, mu ~ U(-mean, mean) and
    sigma ~ U(scale); per example, s ~ N(sigma, scale_std) and m ~ U(mu +- shift_spread); each
    activation z becomes s z + m."""

    mean: NonNegativeFloat
    scale: Annotated[Pair, ok(lambda v: 0 < v[0] <= v[1]), expect("[low, high] with 0 < low")]
    scale_std: NonNegativeFloat
    shift_spread: NonNegativeFloat


def _check_norm_settings(model: MLPConfig | InceptionConfig | ConvNetConfig) -> None:
    """ConfigError unless the model config has the settings section its norm needs (NORMS)."""
    section = NORMS[model.norm].section
    if section is not None and getattr(model, section) is None:
        raise ConfigError(
            f"model.norm={model.norm} needs model.{section}: choose the norm with its config "
            f"group (norm={model.norm}), which sets both"
        )


@dataclass(frozen=True, kw_only=True)
class MLPConfig(_Section):
    """model=mlp: the MNIST network of Section 4.1 (models/mlp.py)."""

    target: Annotated[Literal["bnrepro.models.mlp.MLP"], Field(alias="_target_")]
    in_features: PositiveInt
    hidden: Annotated[list[PositiveInt], Field(min_length=1), expect("a list of positive integers")]
    num_classes: AtLeastTwo
    activation: Activation
    norm: Norm
    dropout: Fraction
    init_std: PositiveFloat
    bn: BNSettings
    # Only with their norm (configs/norm/<norm>.yaml sets them).
    renorm: RenormSettings | None = None
    group_norm: GroupNormSettings | None = None
    noise: NoiseSettings | None = None

    def __post_init__(self) -> None:
        _check_norm_settings(self)

    @property
    def narrowest(self) -> int:
        """The fewest units of a probed layer (trainer.probe.unit must be below it)."""
        return min(self.hidden)


@dataclass(frozen=True, kw_only=True)
class InceptionConfig(_Section):
    """model=bn_inception: BN-Inception of Section 4.2 (models/inception.py)."""

    target: Annotated[Literal["bnrepro.models.inception.BNInception"], Field(alias="_target_")]
    num_classes: AtLeastTwo
    norm: Norm
    activation: Activation
    dropout: Fraction
    lrn: StrictBool
    proj_4cd: PositiveInt
    in_channels: PositiveInt
    stem: Literal["imagenet", "small"]
    width_mult: PositiveFloat
    init_mode: Literal["fan_in", "fan_out"]
    modules: Annotated[
        list[InceptionModule],
        Field(min_length=1),
        ok(_in_table_order),
        expect(f"a list of Inception modules in table order, from {', '.join(_MODULES)}"),
    ]
    bn: BNSettings
    renorm: RenormSettings | None = None
    group_norm: GroupNormSettings | None = None
    noise: NoiseSettings | None = None

    def __post_init__(self) -> None:
        _check_norm_settings(self)

    @property
    def narrowest(self) -> int:
        return max(1, round(64 * self.width_mult))  # conv1's maps, the narrowest probed stage


@dataclass(frozen=True, kw_only=True)
class ConvNetConfig(_Section):
    """model=convnet: the small conv net of the batch-size study (models/convnet.py)."""

    target: Annotated[Literal["bnrepro.models.convnet.ConvNet"], Field(alias="_target_")]
    num_classes: AtLeastTwo
    norm: Norm
    activation: Activation
    dropout: Fraction
    in_channels: PositiveInt
    widths: Annotated[list[PositiveInt], Field(min_length=1), expect("a list of positive ints")]
    strides: Annotated[list[PositiveInt], Field(min_length=1), expect("a list of positive ints")]
    bn: BNSettings
    renorm: RenormSettings | None = None
    group_norm: GroupNormSettings | None = None
    noise: NoiseSettings | None = None

    def __post_init__(self) -> None:
        _check_norm_settings(self)
        if len(self.widths) != len(self.strides):
            raise ConfigError(
                f"model.widths has {len(self.widths)} layers but model.strides "
                f"{len(self.strides)}: give one stride per layer"
            )

    @property
    def narrowest(self) -> int:
        return min(self.widths)


def _in_table_order(modules: list[str]) -> bool:
    order = [_MODULES.index(m) for m in modules]
    return order == sorted(set(order))


@dataclass(frozen=True, kw_only=True)
class MNISTData(_Section):
    """data=mnist or data=fashion_mnist: the in-memory IDX datasets (data/mnist.py)."""

    name: Literal["mnist", "fashion_mnist"]
    root: StrictStr
    download: StrictBool
    batch_size: AtLeastTwo  # BN in training mode: two values per activation for a variance
    eval_batch_size: PositiveInt
    verify_checksums: StrictBool
    sha256: Annotated[
        dict[StrictStr, StrictStr], expect("a mapping of file names to sha256 digests")
    ]
    # Training images held out for validation (class-balanced, data/mnist.validation_split);
    # 0: none, evaluations read the test set (Figure 1). With a split, every evaluation reads
    # the validation images and the test set is read once, at the end.
    val_size: NonNegativeInt = 0
    val_seed: NonNegativeInt = 0  # which images are held out: fixed, recorded in summaries
    # Training accuracy (trainset/acc) on the first this-many training images at every
    # evaluation, in inference mode, as Santurkar et al.'s Figure 2 plots it; 0: none.
    train_eval_size: NonNegativeInt = 0
    # Train on this many of the training images left after the validation split (class-
    # balanced, fixed by val_seed like the split; data/mnist.validation_split); 0: all of them.
    # The batch-size study's conv net uses 10,000 to train 5 epochs of every arm on a CPU.
    train_size: NonNegativeInt = 0


@dataclass(frozen=True, kw_only=True)
class ImageNetData(_Section):
    """data=imagenet: JPEG folders, decoded in workers or on the device (data/imagenet.py)."""

    name: Literal["imagenet"]
    root: StrictStr
    image_size: PositiveInt
    batch_size: AtLeastTwo
    workers: NonNegativeInt
    photometric: NonNegativeFloat
    decode: Decode
    crop_scale: Annotated[
        Pair, ok(lambda v: 0 < v[0] <= v[1] <= 1), expect("[low, high] in (0, 1]")
    ]
    crop_ratio: Annotated[Pair, ok(lambda v: 0 < v[0] <= v[1]), expect("[low, high], 0 < low")]


@dataclass(frozen=True, kw_only=True)
class Schedule(_Section):
    """optim.schedule: exponential decay of the learning rate (Section 4.2)."""

    name: Literal["exponential"]
    gamma: Rate
    base_every_steps: PositiveFloat
    every_steps: PositiveFloat
    # A linear warm-up over this many first steps (Goyal et al. 2017, for large batches); not
    # in configs/optim: absent is none, and leaves every run's hash as it was.
    warmup_steps: NonNegativeInt = 0


@dataclass(frozen=True, kw_only=True)
class OptimConfig(_Section):
    """optim: SGD with momentum; lr = base_lr * lr_mult (optim.py)."""

    base_lr: PositiveFloat
    # x1, x5, x30: an int stays an int (the variant figure scripts group runs by).
    lr_mult: Annotated[PositiveInt | PositiveFloat, expect("a positive number")]
    lr: PositiveFloat
    momentum: Fraction
    weight_decay: NonNegativeFloat
    norm_weight_decay: NonNegativeFloat
    schedule: Schedule | None
    # Keys of one optim config only; the value says what their absence means.
    nesterov: StrictBool = False  # optim=inception
    base_weight_decay: StrictFloat | None = None  # optim=inception: before the recipe's divisor
    fused: StrictBool = False  # optim=sgd: torch's one-kernel update


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(_Section):
    """trainer.probe: which unit's input distribution is traced (Figure 1 b, c)."""

    unit: NonNegativeInt
    num_images: PositiveInt
    percentiles: Annotated[
        list[Annotated[StrictFloat, Field(ge=0, le=100)]], expect("a list of numbers in [0, 100]")
    ]


@dataclass(frozen=True, kw_only=True)
class ICSConfig(_Section):
    """trainer.ics: internal covariate shift and the loss landscape along the gradient
    (Santurkar et al. 2018), measured at every `every`-th training step
    (bnrepro/measures/ics.py)."""

    every: PositiveInt
    # Step sizes along the gradient, as multiples of the learning rate.
    step_scales: Annotated[
        list[PositiveFloat], Field(min_length=1), expect("a list of positive numbers")
    ]


@dataclass(frozen=True, kw_only=True)
class PlateauConfig(_Section):
    """trainer.plateau: stop once every member's best monitored accuracy has gained less than
    `min_gain` points over the last `window` of its steps (training/plateau.py); at
    `min_steps` at the earliest; trainer.steps stays the cap."""

    window: Annotated[StrictFloat, Field(gt=0, lt=1), expect("a fraction in (0, 1)")]
    min_gain: Annotated[StrictFloat, Field(ge=0), expect("accuracy points >= 0")]
    min_steps: PositiveInt


@dataclass(frozen=True, kw_only=True)
class BNStatsProbeConfig(_Section):
    """trainer.bn_stats_probe: at every evaluation, the test accuracy of the same weights with
    each estimate of BN's inference statistics (bnrepro/measures/bn_estimators.py)."""

    ema_momenta: Annotated[list[Rate], expect("a list of numbers in (0, 1]")]
    population_batches: PositiveInt  # Algorithm 2's K
    # Also each estimate's error against precise statistics, per BN layer (bn_estimators.py:
    # `layer_errors`). Absent: off, and every run's hash as it was.
    layer_errors: StrictBool = False


@dataclass(frozen=True, kw_only=True)
class TrainerConfig(_Section):
    """trainer: how long, how often, on what, and how fast (loop.py, run.py)."""

    steps: PositiveInt
    eval_every: PositiveInt
    eval_at_start: StrictBool
    num_threads: PositiveInt
    flush_denormal: StrictBool
    mkl_skip_vendor_check: StrictBool
    device: Device
    amp: Annotated[Literal["bf16"], expect("bf16 or null")] | None
    channels_last: StrictBool
    compile: StrictBool
    sync_bn: StrictBool
    dist_bn: DistBN
    cuda_graph: Annotated[CudaGraph, expect("auto or true or false")]
    cudnn_benchmark: StrictBool
    sync_every: PositiveInt
    # GPU: torch's sync debug mode during the steps (training/loop.SyncDebug); null: off.
    sync_debug: Annotated[Literal["warn", "error"], expect("null or warn or error")] | None
    progress: StrictBool
    checkpoint_every: NonNegativeInt
    diverge_loss: Annotated[StrictFloat, Field(gt=0), expect("null or a positive number")] | None
    probe: ProbeConfig
    # Opt-in measurements of issue 13's experiments; absent (null) elsewhere.
    ics: ICSConfig | None = None
    bn_stats_probe: BNStatsProbeConfig | None = None
    plateau: PlateauConfig | None = None  # null: train for trainer.steps


@dataclass(frozen=True, kw_only=True)
class RecipeConfig(_Section):
    """recipe: Section 4.2.1's switches, read by the optim, model and data configs."""

    weight_decay_div: PositiveFloat
    lr_decay_speedup: PositiveFloat
    lrn: StrictBool
    photometric: NonNegativeFloat


@dataclass(frozen=True, kw_only=True)
class RunConfig(_Section):
    """One job's settings, typed: what `bnrepro.training.run.train` and everything below it read."""

    __pydantic_config__ = ConfigDict(arbitrary_types_allowed=True)  # `source`, a DictConfig

    experiment_name: StrictStr
    arm: StrictStr
    tags: Annotated[list[StrictStr], expect("a list of strings")]
    seed: StrictInt
    seeds: (
        Annotated[
            list[StrictInt],
            Field(min_length=1),
            ok(lambda v: len(set(v)) == len(v)),
            expect("a list of distinct integers"),
        ]
        | None
    )
    resume: Annotated[StrictStr, Field(min_length=1), expect("auto, never or a checkpoint path")]
    # Sections told apart by their tag: data.name, model._target_.
    data: Annotated[MNISTData | ImageNetData, Field(discriminator="name")]
    model: Annotated[MLPConfig | InceptionConfig | ConvNetConfig, Field(discriminator="target")]
    optim: OptimConfig
    trainer: TrainerConfig
    recipe: RecipeConfig
    # The composed config itself: hashed for the run directory, saved, sent to W&B; its free
    # sections (logger: W&B's arguments; paths: folders, some known only inside a job) are
    # read from here.
    source: DictConfig | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        unit, width = self.trainer.probe.unit, self.model.narrowest
        if unit >= width:
            _invalid("trainer.probe.unit", unit, f"an integer in [0, {width})")
        if self.seeds is not None:
            if self.trainer.sync_bn:
                raise ConfigError(
                    "trainer.sync_bn=true does not apply to stacked seeds (seeds=[...]): each "
                    "member's BN is its own; drop one of them"
                )
            if not isinstance(self.data, MNISTData):  # its task serves stacked batches
                raise ConfigError(
                    f"seeds=[...] (stacked training) needs an in-memory dataset (data=mnist "
                    f"or fashion_mnist), not data={self.data.name}; run one seed per job "
                    f"instead: -m seed=1,2,3"
                )
        if self.trainer.ics is not None and not isinstance(self.model, MLPConfig):
            raise ConfigError(
                "trainer.ics measures the layers of the MNIST MLP (model=mlp), one after the "
                "other; set trainer.ics=null for other models"
            )
        probe = self.trainer.bn_stats_probe
        if probe is not None and (self.model.norm != "bn" or self.data.name == "imagenet"):
            raise ConfigError(
                f"trainer.bn_stats_probe compares BN's inference statistics: it needs norm=bn "
                f"and an in-memory dataset (mnist, fashion_mnist), not norm={self.model.norm} "
                f"on {self.data.name}; set trainer.bn_stats_probe=null"
            )
        _check_ghost_batch(self)

    @property
    def variant(self) -> dict[str, Any]:
        """The run's place among the paper's variants, as figure scripts group runs."""
        return {
            "norm": self.model.norm,
            "activation": self.model.activation,
            "dropout": self.model.dropout,
            "lr_mult": self.optim.lr_mult,
            "bn_stats": self.model.bn.stats if is_bn(self.model.norm) else None,
        }


def _check_ghost_batch(run: RunConfig) -> None:
    """ConfigError unless model.bn.ghost_batch (if set) can split each training batch: BN's
    norms and Batch Renorm only, a divisor of data.batch_size (each process's batch, and each
    stacked member's), and no SyncBatchNorm, whose conversion would replace the ghost-batch
    layers."""
    ghost = run.model.bn.ghost_batch
    if ghost is None:
        return
    key = f"model.bn.ghost_batch={ghost}"
    if not (is_bn(run.model.norm) or run.model.norm == "batch_renorm"):
        raise ConfigError(
            f"{key} splits BN's batches, but model.norm={run.model.norm} is not BN "
            f"(bn, noisy_bn) or batch_renorm; drop it"
        )
    if run.data.batch_size % ghost:
        raise ConfigError(
            f"{key} does not divide data.batch_size={run.data.batch_size}: each training "
            f"batch is split into groups of {ghost} examples; use a batch size that is a "
            f"multiple of it, or a ghost batch that divides it"
        )
    if run.trainer.sync_bn:
        raise ConfigError(
            f"{key} normalises groups within each process's batch; trainer.sync_bn=true "
            f"normalises over every process's: drop one of them"
        )


def parse_config(cfg: DictConfig) -> RunConfig:
    """The composed config as a checked, typed RunConfig; ConfigError for the first bad value."""
    values: dict[str, Any] = {"source": cfg}
    for name in _keys(RunConfig):  # the free sections (logger, paths) are not read
        if name in cfg and name != "source":
            node = cfg.get(name)
            values[name] = (
                OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            )
    return parse(RunConfig, values, "")


T = TypeVar("T")


def parse(kind: type[T], node: Any, where: str) -> T:
    """The mapping `node`, the config's section at key `where` ("" for the whole config),
    validated by pydantic as the dataclass `kind`; ConfigError naming its first bad key."""
    try:
        return _adapter(kind).validate_python(node)
    except ValidationError as err:
        raise ConfigError(_one_line(err.errors()[0], node, where)) from None


_adapter = functools.cache(TypeAdapter)  # a validator per class, built on its first use


def _one_line(error: ErrorDetails, node: Any, where: str) -> str:
    """pydantic's error as the line a user reads: the full dotted key, the value given and
    what it must be."""
    kind, loc, ctx, value = error["type"], error["loc"], error.get("ctx") or {}, error["input"]
    if kind.startswith("union_tag"):
        # A section's tag (data.name, model._target_: an alias, which pydantic names last).
        loc = (*loc, re.findall(r"'(\w+)'", ctx["discriminator"])[-1])
        kind = "missing" if kind == "union_tag_not_found" else "literal_error"
        value, ctx = ctx.get("tag"), {"expected": ctx.get("expected_tags", "")}
    if kind == "missing":
        section = _key(loc[:-1], node, where)
        key = _join(section, str(loc[-1]))
        return f"{key} is missing; every config of {section or 'the run'} sets it"
    if kind == "not_a_setting":
        key = _key((*loc, ctx["key"]), node, where)
        return f"{key} is not a setting (expected one of {ctx['settings']}); check its spelling"
    if kind == "literal_error":  # pydantic's "'ema', 'cumulative' or 'population'"
        expected = re.sub(r"'([^']*)'", r"\1", ctx["expected"]).replace(", ", " or ")
    else:
        expected = ctx.get("expected") or _EXPECTED.get(kind) or error["msg"].lower()
    return f"{_key(loc, node, where)}={value!r} is invalid: expected {expected}."


# What a value must be, by pydantic's error type where its `ctx` does not say.
_EXPECTED = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "dataclass_type": "a mapping of settings",
    "model_attributes_type": "a mapping of settings",
}


def _key(loc: tuple[int | str, ...], node: Any, where: str) -> str:
    """The dotted config key of pydantic's error location in `node`. pydantic puts the tag of
    a union's member into it (model.bnrepro.models.mlp.MLP.hidden): not a key, left out."""
    key = where
    for part in loc:
        if isinstance(node, Mapping) and part in node or isinstance(node, list):
            node = node[part]
            key = _join(key, str(part))
    return key


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _invalid(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}.")
