"""The one training entrypoint: `python -m bnrepro.train experiment=mnist/bn seed=2`.

Every experiment of the suite runs through here, MNIST or ImageNet, one process or many
under torchrun; Hydra composes the config and, with `-m`, sweeps it. Each job writes
metrics.jsonl, summary.json and (logger=wandb) one W&B run into its own run directory.

This module imports no torch: with `-m`, the launching process only checks the command line
and hands configs to the launcher, and sparing it torch's import starts a sweep ~2 s sooner.
The job itself (`bnrepro.training.run.train`) is imported in the process that runs it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from bnrepro.config.resolvers import register_resolvers
from bnrepro.config.schema import parse_config
from bnrepro.errors import RunHeld, UserError
from bnrepro.infra.launcher_watch import die_with_launcher
from bnrepro.infra.preflight import preflight
from bnrepro.speedups.mkl_vendor import skip_vendor_check

register_resolvers()
log = logging.getLogger("bnrepro.train")
# An absolute path, so `python -m bnrepro.train` and the `bnrepro-train` script find the same
# configs (the package is installed editable from the checkout).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


class SweepJobHeld(CompactHydraException):
    """A sweep's job whose run another process is training. Raised (not sys.exit) so that it
    fails this job alone: Hydra runs the sweep's other jobs, then exits 1 printing this line
    (exiting at once would end the sweep, and under joblib kill the jobs already running)."""


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    if cfg.trainer.mkl_skip_vendor_check:  # opt-in; before torch is imported, or it cannot take
        log.info(skip_vendor_check())
    else:
        log.info("MKL kernels: its own choice (trainer.mkl_skip_vendor_check=false)")
    from bnrepro.infra.distributed import init_distributed, shutdown
    from bnrepro.training.run import train

    env = None
    finished = False
    try:
        run_cfg = parse_config(cfg)  # typed and checked: what the run reads from here on
        env = init_distributed(run_cfg.trainer.device)
        train(run_cfg, env)
        finished = True
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, RunHeld) and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise SweepJobHeld(f"error: {exc}") from None
        sys.exit(2)
    finally:
        if env is not None:
            shutdown(env, finished)


def run() -> None:
    """The console entry (`bnrepro-train`, `python -m bnrepro.train`): check the command line
    first, so that a typo costs one line and no job starts, then hand it to Hydra. A torchrun
    worker first arranges to end with its launcher (infra/launcher_watch.py)."""
    die_with_launcher()
    try:
        preflight(sys.argv[1:], CONFIG_DIR)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    run()
