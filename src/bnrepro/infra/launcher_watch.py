"""A torchrun worker ends when its launcher dies, however it dies.

torchrun starts each worker in a session of its own (`start_new_session=True` in torch's
SubprocessHandler), so a signal to the launcher's process group never reaches the workers, and
a launcher killed with SIGKILL (by a user, or a scheduler killing one pid) cannot forward
anything. Its workers then train on, orphaned, to the end of the job, and a resume started
beside them makes two processes write one run directory (the run lock, infra/run_lock.py, keeps
the second one out, but the orphans still hold the lock and the devices).

So each worker asks the kernel for SIGKILL when its parent dies (Linux's PR_SET_PDEATHSIG).
SIGKILL, not SIGTERM: the ranks could not agree on a last checkpoint without their launcher's
store, and a rank waiting in a collective for a dead peer would never exit; the periodic
checkpoints (`trainer.checkpoint_every`) are what a resume starts from. Torch-free: it runs
before torch is imported, so the window before it takes effect is a fraction of a second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def under_torchrun() -> bool:
    """Whether this process is a worker that torchrun (torch.distributed.run) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher() -> bool:
    """Under torchrun on Linux, have the kernel SIGKILL this process when its parent (the
    launcher) exits; return whether that is now armed. A launcher that is already gone (this
    process was re-parented before arming) ends this process at once."""
    if not (under_torchrun() and sys.platform.startswith("linux")):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False  # not available (seccomp, say): the worker lives as before
    if parent == 1 or os.getppid() != parent:  # the launcher died before the request took
        os.kill(os.getpid(), signal.SIGKILL)
    return True
