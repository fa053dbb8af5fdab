"""SIGTERM and SIGUSR1 (what SLURM sends before it preempts or times out a job) end a run
cleanly: the loop checkpoints at the end of the current step, then the run exits.

Under submitit (the SLURM launcher) the handler that was installed before ours is submitit's,
which requeues the job; it runs after our checkpoint, and the requeued job resumes from it.
Otherwise the process exits with EXIT_PREEMPTED, which `torchrun --max-restarts` and job
scripts can take as "run me again".
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a temporary failure, try again
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignals:
    """Context manager: while inside, SIGTERM/SIGUSR1 only set a flag (`requested`)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        return self.received is not None

    def hand_over(self) -> None:
        """After the checkpoint: let the handler that was there before (submitit's requeue)
        act on the signal; without one, exit with EXIT_PREEMPTED."""
        previous = self.previous.get(self.received) if self.received else None
        if callable(previous):
            previous(self.received, None)
        raise SystemExit(EXIT_PREEMPTED)
