"""Check a command line before Hydra runs it: bad input costs one line, not a traceback.

Hydra reports an unknown key or config group with a multi-line message and a hint about
HYDRA_FULL_ERROR, and only once the job starts (after a multirun has launched every other
job). Here the overrides are composed the way Hydra will compose them (every value of a sweep
is tried), each config is checked, the run directory must be writable and a SLURM launcher
needs SLURM on this machine; the first problem becomes one ConfigError line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from bnrepro.config.schema import parse_config
from bnrepro.errors import ConfigError

# Flags after which Hydra does something else than training; leave those to Hydra.
HYDRA_ONLY = (
    "-h",
    "--help",
    "--hydra-help",
    "--version",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--package",
    "-p",
    "--resolve",
)


def one_line(exc: Exception) -> str:
    """Hydra's message, first line, plus the available options or the hint it gives."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else type(exc).__name__
    if any(line.startswith("Available options") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = [
            line
            for line in lines[start + 1 :]
            if not line.startswith(("Config search path", "provider="))
        ]
        message += f" (available: {', '.join(options)})"
    hint = next((line for line in lines if line.startswith("To append to your config")), None)
    return f"{message} {hint}." if hint else message


def override_sets(argv: list[str]) -> tuple[list[list[str]], bool]:
    """The override lists to compose (each sweep value once) and whether it is a multirun."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if a[:1] != "-"])
    except Exception as exc:  # noqa: BLE001 - Hydra's parser raises several kinds
        raise ConfigError(f"cannot read the command line: {one_line(exc)}") from exc
    sweeps = [
        (o.get_key_element(), list(o.sweep_string_iterator()))
        for o in parsed
        if o.is_sweep_override()
    ]
    if sweeps and not multirun:
        key = sweeps[0][0]
        raise ConfigError(
            f"{key}={','.join(sweeps[0][1])} sweeps several values; add -m "
            f"(--multirun) to run one job per value"
        )
    base = [o.input_line for o in parsed if not o.is_sweep_override()]
    firsts = {key: values[0] for key, values in sweeps}
    sets = [base + [f"{k}={v}" for k, v in firsts.items()]]
    for key, values in sweeps:
        for value in values[1:]:
            sets.append(base + [f"{k}={value if k == key else v}" for k, v in firsts.items()])
    return sets, multirun


def check_writable(path: Path) -> None:
    """Check that the run (or sweep) directory can be created, as Hydra will try: a folder it
    cannot create (read-only, a file in the way, /proc) is one line here instead of Hydra's
    traceback. Probes with a temporary folder in the deepest existing parent, and leaves
    nothing behind."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".bnrepro-write-check-", dir=existing))
    except OSError as exc:
        raise ConfigError(
            f"cannot create the run directory {path} ({exc.strerror or exc}); set "
            f"hydra.run.dir (hydra.sweep.dir with -m) or BNREPRO_LOG_DIR to a writable folder"
        ) from exc


SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def check_launcher(cfg: DictConfig) -> None:
    """A SLURM launcher (hydra/launcher=slurm or submitit_slurm) needs SLURM's commands on this
    machine: submitit submits with sbatch and first looks for srun, else raises a RuntimeError
    (a traceback) once the sweep directory exists. Here it is one line that says what to do."""
    if cfg.hydra.launcher.get("_target_") != SLURM_LAUNCHER:
        return
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        choice = cfg.hydra.runtime.choices.get("hydra/launcher", "slurm")
        raise ConfigError(
            f"hydra/launcher={choice} submits the jobs to SLURM, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH here (no SLURM on this "
            f"machine); run the sweep on a SLURM login node, or here with "
            f"hydra/launcher=joblib or hydra/launcher=local_procs"
        )


def preflight(argv: list[str], config_dir: str, config_name: str = "train") -> None:
    """Raise ConfigError for the first problem of the command line `argv`."""
    if any(a.split("=")[0] in HYDRA_ONLY for a in argv):
        return
    sets, multirun = override_sets(argv)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            for overrides in sets:
                try:
                    cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
                except Exception as exc:  # noqa: BLE001 - every composition error alike
                    raise ConfigError(one_line(exc)) from exc
                parse_config(cfg)
                check_writable(Path(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir))
                if multirun:  # a single run ignores the launcher
                    check_launcher(cfg)
    finally:
        GlobalHydra.instance().clear()
