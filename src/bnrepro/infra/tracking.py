"""Where a run's numbers go: local files always, W&B when asked.

Local files are the record the figures are built from: ``metrics.jsonl`` (one JSON object
per evaluation, deterministic: the same config and seed give the same bytes),
``perf.jsonl`` (speed, which is not) and ``summary.json``. W&B mirrors them; a W&B failure
is reported once and never stops training or loses a local line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf; a diverged loss is written as null rather than breaking the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    """One run's sink for metric records, summary values and images."""

    def __init__(
        self, run_dir: Path, wandb_run: Any | None, history: list[dict[str, Any]] | None = None
    ) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        # A resumed run rewrites the records of its checkpoint: no duplicate, no missing step.
        self._metrics = self.metrics_path.open("w")
        self._perf = (run_dir / "perf.jsonl").open("a")
        for record in history or []:
            self._write(self._metrics, record)
        self._wandb = wandb_run

    @property
    def wandb_id(self) -> str | None:
        return getattr(self._wandb, "id", None)

    @staticmethod
    def _write(file: Any, record: Mapping[str, Any]) -> None:
        file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        file.flush()

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one evaluation record (it must hold "step")."""
        self._write(self._metrics, record)
        self._to_wandb(lambda run: run.log(dict(record)))

    def log_perf(self, record: Mapping[str, Any]) -> None:
        """Timings: perf.jsonl and W&B, never metrics.jsonl (they differ run to run)."""
        self._write(self._perf, record)
        self._to_wandb(lambda run: run.log(dict(record)))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json_atomic(self.summary_path, {k: _jsonable(v) for k, v in summary.items()})
        self._to_wandb(lambda run: run.summary.update(dict(summary)))

    def log_image(self, key: str, path: Path) -> None:
        def send(run: Any) -> None:
            import wandb

            run.log({key: wandb.Image(str(path))})

        self._to_wandb(send)

    def close(self) -> None:
        self._metrics.close()
        self._perf.close()

    def _to_wandb(self, action: Any) -> None:
        if self._wandb is None:
            return
        try:
            action(self._wandb)
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            log.warning(
                "W&B logging failed (%s: %s); continuing with local logs only.",
                type(exc).__name__,
                exc,
            )
            self._wandb = None


class NullTracker(Tracker):
    """What ranks other than 0 log to: nothing (one set of files and one W&B run per job)."""

    def __init__(self) -> None:
        self._wandb = None

    def log(self, record: Mapping[str, Any]) -> None:
        pass

    def log_perf(self, record: Mapping[str, Any]) -> None:
        pass

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def log_image(self, key: str, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


def _init_wandb(
    logger_cfg: Mapping[str, Any], mode: str, run_dir: Path, config: Mapping, run_id: str | None
) -> Any:
    import wandb

    return wandb.init(
        id=run_id,
        resume="allow" if run_id else None,
        project=logger_cfg["project"],
        entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group"),
        name=logger_cfg.get("name"),
        tags=list(logger_cfg.get("tags") or []),
        mode=mode,
        dir=str(run_dir),
        config=dict(config),
        # Multiruns of the basic launcher share one process: each job needs its own run.
        reinit="create_new",
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True, init_timeout=60),
    )


def start_wandb(
    logger_cfg: Mapping[str, Any],
    run_dir: Path,
    config: Mapping[str, Any],
    run_id: str | None = None,
) -> Any:
    """Start this job's one W&B run; if online fails, offline; if that fails too, None.

    Each fallback prints one warning: W&B trouble never stops training.
    """
    mode = logger_cfg.get("mode") or "offline"
    run = None
    for attempt in dict.fromkeys([mode, "offline"]):
        try:
            run = _init_wandb(logger_cfg, attempt, run_dir, config, run_id)
            break
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            fallback = "logging offline instead" if attempt != "offline" else "local logs only"
            log.warning(
                "W&B %s run could not start (%s: %s); %s.",
                attempt,
                type(exc).__name__,
                exc,
                fallback,
            )
    if run is None:
        return None
    run.define_metric("step")
    for pattern in ("train/*", "test/*", "act/*", "perf/*"):
        run.define_metric(pattern, step_metric="step")
    run.define_metric("test/acc", step_metric="step", summary="max")
    return run


@contextlib.contextmanager
def tracking(
    run_dir: Path,
    logger_cfg: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    enabled: bool = True,
    history: list[dict[str, Any]] | None = None,
    wandb_id: str | None = None,
) -> Iterator[Tracker]:
    """Open the run's local files and, if `logger_cfg` is given, exactly one W&B run
    (continuing run `wandb_id` when resuming, with the local `history` rewritten first).

    With enabled=False (distributed ranks other than 0) nothing is written anywhere.
    """
    if not enabled:
        yield NullTracker()
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        wandb_run = start_wandb(logger_cfg, run_dir, config, wandb_id) if logger_cfg else None
        if wandb_run is not None:
            stack.enter_context(wandb_run)  # finishes the run, also when training raises
        tracker = Tracker(run_dir, wandb_run, history)
        stack.callback(tracker.close)
        yield tracker


def open_trackers(
    stack: contextlib.ExitStack,
    runs: Sequence[tuple[Any, Path]],
    enabled: bool,
    histories: Sequence[list[dict[str, Any]]] | None = None,
    wandb_ids: Sequence[str | None] | None = None,
) -> list[Tracker]:
    """One tracker per (config, run directory), closed with `stack`; W&B when configured."""
    trackers = []
    for i, (cfg, run_dir) in enumerate(runs):
        config = OmegaConf.to_container(cfg, resolve=True)
        logger_cfg = config["logger"] if config.get("logger") else None
        history = histories[i] if histories else None
        run_id = wandb_ids[i] if wandb_ids else None
        trackers.append(
            stack.enter_context(tracking(run_dir, logger_cfg, config, enabled, history, run_id))
        )
    return trackers
