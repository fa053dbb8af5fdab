"""The config's typed schema: what each key may hold, checked once, read as one object.

Hydra composes the YAML in configs/ (where the values and their paper citations live);
`parse_config` checks the composed config against the dataclasses below and returns one
frozen `RunConfig`, which is what the code reads (`cfg.trainer.steps`, `cfg.model.bn.stats`).
A value of the wrong type or out of range, a missing key or a misspelt one is one line
(ConfigError) before any data is read or any file written. The models, tasks and loop do not
check their settings again. The choices (activation, norm, BN statistics ...) are the
`Literal` types here, and nowhere else.

The composed DictConfig stays the config as data: `RunConfig.source` is what is hashed for the
run directory, saved beside each run and sent to W&B.

This module imports no torch: the launching process checks a command line with it.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf

from bnrepro.errors import ConfigError

Activation = Literal["sigmoid", "relu"]
# What normalises each layer before its nonlinearity (models/norms.py): the paper's BN, none,
# and the alternatives of later work (issue 13): Batch Renormalization (Ioffe 2017), GroupNorm
# (Wu & He 2018), LayerNorm, and BN followed by noise that shifts its output distribution at
# every step (Santurkar et al. 2018).
Norm = Literal["none", "bn", "batch_renorm", "group_norm", "layer_norm", "noisy_bn"]
StatsMode = Literal["ema", "cumulative", "population"]  # BN inference statistics (batchnorm.py)
Device = Literal["auto", "cpu", "cuda"]
DistBN = Literal["reduce", "broadcast"]  # BN running statistics across ranks (distributed.py)
# Where ImageNet training JPEGs are decoded and augmented: PIL in the DataLoader workers, or the
# run's device on whole batches (the workers only read bytes); auto = device on CUDA.
Decode = Literal["auto", "workers", "device"]
# The rows of BN-Inception's appendix table (models/inception.INCEPTION_TABLE), in order.
InceptionModule = Literal["3a", "3b", "3c", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
CudaGraph = Literal["auto", True, False]


def choices(kind: Any) -> tuple[Any, ...]:
    """The values of a Literal type: choices(Activation) == ("sigmoid", "relu")."""
    return get_args(kind)


def rule(ok: Callable[[Any], bool], expected: str, key: str | None = None) -> Any:
    """A field whose value must also pass `ok`; `expected` says what it must be. `key` is the
    config's name for it where that is not a Python name (`_target_`)."""
    return field(metadata={"ok": ok, "expected": expected, "key": key})


def _positive(expected: str = "a positive integer") -> Any:
    return rule(lambda v: v > 0, expected)


def _at_least(low: int) -> Any:
    return rule(lambda v: v >= low, f"an integer >= {low}")


@dataclass(frozen=True, kw_only=True)
class BNSettings:
    """model.bn: how BN's inference statistics are obtained (models/batchnorm.BNStats)."""

    stats: StatsMode
    momentum: float  # torch's EMA momentum (ema; population trains with it, then discards it)
    eps: float = _positive("a positive number")
    population_batches: int = _positive()  # K of Algorithm 2


@dataclass(frozen=True, kw_only=True)
class RenormSettings:
    """model.renorm (norm=batch_renorm): Algorithm 1 of Ioffe 2017 (models/batch_renorm.py)."""

    r_max: float = rule(lambda v: v >= 1, "a number >= 1")
    d_max: float = rule(lambda v: v >= 0, "a number >= 0")
    warmup_steps: int = rule(lambda v: v >= 0, "an integer >= 0")  # r = 1, d = 0: plain BN
    r_max_steps: int = rule(lambda v: v >= 0, "an integer >= 0")  # r_max reached at this step
    d_max_steps: int = rule(lambda v: v >= 0, "an integer >= 0")  # d_max reached at this step
    momentum: float = rule(lambda v: 0 < v <= 1, "a number in (0, 1]")  # the paper's alpha
    eps: float = _positive("a positive number")


@dataclass(frozen=True, kw_only=True)
class GroupNormSettings:
    """model.group_norm (norm=group_norm): a layer of C channels gets gcd(C, groups) groups."""

    groups: int = _positive()
    eps: float = _positive("a positive number")


@dataclass(frozen=True, kw_only=True)
class NoiseSettings:
    """model.noise (norm=noisy_bn): what is drawn afresh at every step for each unit j of a
    BN layer's output z (models/norms.ActivationNoise): a scale s_j in [scale], a mean m_j in
    [-mean, mean] and a spread v_j in [0, std]; each activation becomes s_j z + m_j + v_j n,
    n standard normal per example."""

    mean: float = rule(lambda v: v >= 0, "a number >= 0")
    std: float = rule(lambda v: v >= 0, "a number >= 0")
    scale: tuple[float, float] = rule(lambda v: 0 < v[0] <= v[1], "[low, high] with 0 < low")


# The settings section each norm needs besides model.norm (set by its configs/norm/ file).
NORM_SECTIONS = {
    "bn": "bn",
    "noisy_bn": "noise",
    "batch_renorm": "renorm",
    "group_norm": "group_norm",
}


def _check_norm_settings(model: MLPConfig | InceptionConfig) -> None:
    section = NORM_SECTIONS.get(model.norm)
    if section is not None and getattr(model, section) is None:
        raise ConfigError(
            f"model.norm={model.norm} needs model.{section}: choose the norm with its config "
            f"group (norm={model.norm}), which sets both"
        )


@dataclass(frozen=True, kw_only=True)
class MLPConfig:
    """model=mlp: the MNIST network of Section 4.1 (models/mlp.py)."""

    target: Literal["bnrepro.models.mlp.MLP"] = rule(lambda v: True, "", key="_target_")
    in_features: int = _positive()
    hidden: list[int] = rule(lambda v: len(v) > 0 and min(v) > 0, "a list of positive integers")
    num_classes: int = _at_least(2)
    activation: Activation
    norm: Norm
    dropout: float = rule(lambda v: 0 <= v < 1, "a number in [0, 1)")
    init_std: float = _positive("a positive number")
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
class InceptionConfig:
    """model=bn_inception: BN-Inception of Section 4.2 (models/inception.py)."""

    target: Literal["bnrepro.models.inception.BNInception"] = rule(
        lambda v: True, "", key="_target_"
    )
    num_classes: int = _at_least(2)
    norm: Norm
    activation: Activation
    dropout: float = rule(lambda v: 0 <= v < 1, "a number in [0, 1)")
    lrn: bool
    proj_4cd: int = _positive()
    in_channels: int = _positive()
    stem: Literal["imagenet", "small"]
    width_mult: float = _positive("a positive number")
    init_mode: Literal["fan_in", "fan_out"]
    modules: list[InceptionModule] = rule(
        lambda v: len(v) > 0 and _in_table_order(v),
        f"a list of Inception modules in table order, from {', '.join(get_args(InceptionModule))}",
    )
    bn: BNSettings
    renorm: RenormSettings | None = None
    group_norm: GroupNormSettings | None = None
    noise: NoiseSettings | None = None

    def __post_init__(self) -> None:
        _check_norm_settings(self)

    @property
    def narrowest(self) -> int:
        return max(1, round(64 * self.width_mult))  # conv1's maps, the narrowest probed stage


def _in_table_order(modules: list[str]) -> bool:
    order = [get_args(InceptionModule).index(m) for m in modules]
    return order == sorted(set(order))


@dataclass(frozen=True, kw_only=True)
class MNISTData:
    """data=mnist or data=fashion_mnist: the in-memory IDX datasets (data/mnist.py)."""

    name: Literal["mnist", "fashion_mnist"]
    root: str
    download: bool
    # BN in training mode needs at least two values per activation to have a variance.
    batch_size: int = _at_least(2)
    eval_batch_size: int = _positive()
    verify_checksums: bool
    sha256: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class ImageNetData:
    """data=imagenet: JPEG folders, decoded in workers or on the device (data/imagenet.py)."""

    name: Literal["imagenet"]
    root: str
    image_size: int = _positive()
    batch_size: int = _at_least(2)
    workers: int = rule(lambda v: v >= 0, "an integer >= 0")
    photometric: float = rule(lambda v: v >= 0, "a number >= 0")
    decode: Decode
    crop_scale: tuple[float, float] = rule(lambda v: 0 < v[0] <= v[1] <= 1, "[low, high] in (0, 1]")
    crop_ratio: tuple[float, float] = rule(lambda v: 0 < v[0] <= v[1], "[low, high], 0 < low")


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """optim.schedule: exponential decay of the learning rate (Section 4.2)."""

    name: Literal["exponential"]
    gamma: float = rule(lambda v: 0 < v <= 1, "a number in (0, 1]")
    base_every_steps: float = _positive("a positive number")
    every_steps: float = _positive("a positive number")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """optim: SGD with momentum; lr = base_lr * lr_mult (optim.py)."""

    base_lr: float = _positive("a positive number")
    lr_mult: int | float = _positive("a positive number")  # x1, x5, x30
    lr: float = _positive("a positive number")
    momentum: float = rule(lambda v: 0 <= v < 1, "a number in [0, 1)")
    weight_decay: float = rule(lambda v: v >= 0, "a number >= 0")
    norm_weight_decay: float = rule(lambda v: v >= 0, "a number >= 0")
    schedule: Schedule | None
    # Keys of one optim config only; the value says what their absence means.
    nesterov: bool = False  # optim=inception
    base_weight_decay: float | None = None  # optim=inception: weight_decay before the recipe's
    fused: bool = False  # optim=sgd: torch's one-kernel update


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """trainer.probe: which unit's input distribution is traced (Figure 1 b, c)."""

    unit: int = rule(lambda v: v >= 0, "an integer >= 0")
    num_images: int = _positive()
    percentiles: list[float] = rule(
        lambda v: all(0 <= p <= 100 for p in v), "a list of numbers in [0, 100]"
    )


@dataclass(frozen=True, kw_only=True)
class ICSConfig:
    """trainer.ics: internal covariate shift and the loss landscape along the gradient
    (Santurkar et al. 2018), measured at every `every`-th training step
    (bnrepro/measures/ics.py)."""

    every: int = _positive()
    # Step sizes along the gradient, as multiples of the learning rate.
    step_scales: list[float] = rule(
        lambda v: len(v) > 0 and min(v) > 0, "a list of positive numbers"
    )


@dataclass(frozen=True, kw_only=True)
class BNStatsProbeConfig:
    """trainer.bn_stats_probe: at every evaluation, the test accuracy of the same weights with
    each estimate of BN's inference statistics (bnrepro/measures/bn_estimators.py)."""

    ema_momenta: list[float] = rule(
        lambda v: all(0 < m <= 1 for m in v), "a list of numbers in (0, 1]"
    )
    population_batches: int = _positive()  # Algorithm 2's K


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """trainer: how long, how often, on what, and how fast (loop.py, run.py)."""

    steps: int = _positive()
    eval_every: int = _positive()
    eval_at_start: bool
    num_threads: int = _positive()
    flush_denormal: bool
    mkl_skip_vendor_check: bool
    device: Device
    amp: Literal["bf16"] | None
    channels_last: bool
    compile: bool
    sync_bn: bool
    dist_bn: DistBN
    cuda_graph: CudaGraph
    cudnn_benchmark: bool
    sync_every: int = _positive()
    progress: bool
    checkpoint_every: int = rule(lambda v: v >= 0, "an integer >= 0")
    diverge_loss: float | None = rule(lambda v: v is None or v > 0, "null or a positive number")
    probe: ProbeConfig
    # Opt-in measurements of issue 13's experiments; absent (null) elsewhere.
    ics: ICSConfig | None = None
    bn_stats_probe: BNStatsProbeConfig | None = None


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    """recipe: Section 4.2.1's switches, read by the optim, model and data configs."""

    weight_decay_div: float = _positive("a positive number")
    lr_decay_speedup: float = _positive("a positive number")
    lrn: bool
    photometric: float = rule(lambda v: v >= 0, "a number >= 0")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One job's settings, typed: what `bnrepro.training.run.train` and everything below it read."""

    experiment_name: str
    arm: str
    tags: list[str]
    seed: int
    seeds: list[int] | None = rule(
        lambda v: v is None or (len(v) > 0 and len(set(v)) == len(v)),
        "a list of distinct integers",
    )
    resume: str = rule(lambda v: v != "", "auto, never or a checkpoint path")
    data: MNISTData | ImageNetData
    model: MLPConfig | InceptionConfig
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
            if not isinstance(self.model, MLPConfig):
                raise ConfigError(
                    "seeds=[...] (stacked training) needs the MNIST MLP (model=mlp); "
                    "run one seed per job instead: -m seed=1,2,3"
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

    @property
    def variant(self) -> dict[str, Any]:
        """The run's place among the paper's variants, as figure scripts group runs."""
        return {
            "norm": self.model.norm,
            "activation": self.model.activation,
            "dropout": self.model.dropout,
            "lr_mult": self.optim.lr_mult,
            "bn_stats": self.model.bn.stats if self.model.norm in ("bn", "noisy_bn") else None,
        }


_MISSING = object()  # a key the composed config lacks


def parse_config(cfg: DictConfig) -> RunConfig:
    """The composed config as a checked, typed RunConfig; ConfigError for the first bad value."""
    values: dict[str, Any] = {}
    for name in (f.name for f in dataclasses.fields(RunConfig) if f.name != "source"):
        node = cfg.get(name) if name in cfg else _MISSING
        if OmegaConf.is_config(node):
            node = OmegaConf.to_container(node, resolve=True)
        values[name] = node
    run = parse(RunConfig, values, "", exclude=("source",))
    return dataclasses.replace(run, source=cfg)


def parse(kind: type, node: Any, where: str, exclude: tuple[str, ...] = ()) -> Any:
    """Check the mapping `node` (the config at key `where`) against the dataclass `kind`."""
    if not isinstance(node, Mapping):
        _invalid(where, node, f"a mapping of {kind.__name__}'s settings")
    hints = get_type_hints(kind)
    fields = [f for f in dataclasses.fields(kind) if f.name not in exclude]
    keys = {f.metadata.get("key") or f.name: f for f in fields}
    unknown = sorted(k for k in node if k not in keys and not str(k).startswith("_"))
    if unknown:
        key = _join(where, unknown[0])
        raise ConfigError(
            f"{key} is not a setting (expected one of {', '.join(keys)}); check its spelling"
        )
    values = {}
    for key, f in keys.items():
        path = _join(where, key)
        if (key not in node or node[key] is _MISSING) and f.default is not dataclasses.MISSING:
            values[f.name] = f.default  # a key only some configs of the group have
            continue
        if key not in node or node[key] is _MISSING:
            raise ConfigError(f"{path} is missing; every config of {where or 'the run'} sets it")
        value = node[key]
        expected = f.metadata.get("expected") or _describe(hints[f.name])
        if not _fits(value, hints[f.name]):
            _invalid(path, value, expected)
        value = _convert(value, hints[f.name], path)
        ok = f.metadata.get("ok")
        if ok is not None and value is not None and not ok(value):
            _invalid(path, node[key], expected)
        values[f.name] = value
    return kind(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _invalid(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key}={value!r} is invalid: expected {expected}.")


def _members(kind: Any) -> tuple[Any, ...]:
    """The alternatives of a union (X | Y, Optional[X]); (kind,) otherwise."""
    if get_origin(kind) in (Union, types.UnionType):
        return get_args(kind)
    return (kind,)


def _tag(kind: type) -> tuple[str, tuple[Any, ...]]:
    """A dataclass's discriminating field: its first Literal one (data.name, model._target_)."""
    hints = get_type_hints(kind)
    for f in dataclasses.fields(kind):
        if get_origin(hints[f.name]) is Literal:
            return f.metadata.get("key") or f.name, get_args(hints[f.name])
    raise TypeError(f"{kind.__name__} has no Literal field to tell it apart")


def _fits(value: Any, kind: Any) -> bool:
    """Whether `value` has the type `kind` (dataclasses are checked when converted)."""
    if kind is Any:
        return True
    if len(_members(kind)) > 1:
        return any(_fits(value, k) for k in _members(kind))
    if kind is type(None):
        return value is None
    if dataclasses.is_dataclass(kind) or kind is DictConfig:
        return isinstance(value, Mapping)
    origin = get_origin(kind)
    if origin is Literal:  # `True == 1`: compare types too
        return any(value == c and type(value) is type(c) for c in get_args(kind))
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        args = get_args(kind)
        if origin is tuple:
            return len(value) == len(args) and all(map(_fits, value, args))
        return all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, Mapping)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def _convert(value: Any, kind: Any, where: str) -> Any:
    """`value` as `kind`: nested dataclasses parsed, numbers of float fields as floats."""
    if value is None:
        return None
    members = [k for k in _members(kind) if k is not type(None)]
    classes = [k for k in members if dataclasses.is_dataclass(k)]
    if classes:
        if len(classes) == 1:
            return parse(classes[0], value, where)
        for k in classes:  # a union of sections: the one whose tag the value names
            key, tags = _tag(k)
            if value.get(key) in tags:
                return parse(k, value, where)
        names = " or ".join(str(t) for k in classes for t in _tag(k)[1])
        _invalid(_join(where, _tag(classes[0])[0]), value.get(_tag(classes[0])[0]), names)
    kind = members[0]
    origin = get_origin(kind)
    if kind is float:
        return float(value)
    if origin is tuple:
        return tuple(_convert(v, k, where) for v, k in zip(value, get_args(kind), strict=True))
    if origin is list:
        return [_convert(v, get_args(kind)[0], where) for v in value]
    return value


def _describe(kind: Any) -> str:
    """What a value of type `kind` is, in the words of an error line."""
    members = _members(kind)
    if len(members) > 1:
        return " or ".join(_describe(k) for k in members)
    if kind is type(None):
        return "null"
    if get_origin(kind) is Literal:
        return " or ".join(
            str(c).lower() if isinstance(c, bool) else str(c) for c in get_args(kind)
        )
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if kind in names:
        return names[kind]
    if get_origin(kind) is list:
        return f"a list of {_describe(get_args(kind)[0]).removeprefix('an ').removeprefix('a ')}s"
    if get_origin(kind) is tuple:
        return f"a list of {len(get_args(kind))} numbers"
    return "a mapping"
