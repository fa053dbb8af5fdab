"""One training process per run directory: an exclusive lock, held for the whole run.

A run launched twice at once (a sweep re-submitted while its jobs still run) would otherwise
resume from the other's checkpoint, and both would write the same files to the end. The lock is
`flock` on `<run_dir>/.lock`: the kernel drops it when its process ends in any way, SIGKILL
included, so a dead process can never keep a run (a stale lock is taken over without asking).
The file names its holder (pid, host, start time) for the one line the second process prints.
Forked children (DataLoader workers) share the lock: after a SIGKILL it lasts until they notice
and exit, within seconds, and the line says so.
flock works across machines on NFSv4 and on Lustre mounted with `-o flock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from bnrepro.errors import RunHeld
from bnrepro.infra.distributed import DistEnv, broadcast_object

LOCK_NAME = ".lock"


def holder_of(fd: int) -> dict[str, object]:
    """The holder's record in the lock file. A holder writes it right after locking, so an
    empty file means it is doing so now: wait a moment for it."""
    for _ in range(50):
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        with contextlib.suppress(ValueError, TypeError):
            return dict(json.loads(text))
        time.sleep(0.02)
    return {}


def has_ended(pid: object, host: object) -> bool:
    """Whether the holder is known to be gone: a process of this machine that no longer runs."""
    if host != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, as another user
        return False
    return False


def refusal(run_dir: Path, holder: dict[str, object]) -> str:
    """The line a second process prints: who holds the run, and what to do."""
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    started = f" (started {holder['started']})" if "started" in holder else ""
    if has_ended(pid, host):
        # Forked children (DataLoader workers) share the lock; killed with SIGKILL, their
        # parent leaves them to notice within seconds (torch checks every 5 s) and exit.
        return (
            f"run {run_dir} is held by child processes of process {pid} on {host}{started}, "
            f"which has ended; they exit within seconds: try again"
        )
    return (
        f"run {run_dir} is held by process {pid} on {host}{started}: it is still training; "
        f"wait for it or stop it"
    )


def acquire(run_dir: Path) -> int:
    """Lock `run_dir` for this process and return the lock's file descriptor; RunHeld (one line)
    when another process holds it."""
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_of(fd)
            os.close(fd)
            raise RunHeld(refusal(run_dir, holder)) from None
        # A holder that let go between our open and our lock had unlinked that file (release):
        # a lock on it guards nothing, as the next process creates a new one. Start again.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            break
        os.close(fd)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)  # a dead holder's record may be there
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def release(run_dir: Path, fd: int) -> None:
    """Remove the lock file, then let go of it: removed while still held, no other process can
    lock this file after us (acquire checks that the file it locked is still the path's), and
    a finished run directory keeps no trace of it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(run_dir / LOCK_NAME)
    os.close(fd)


@contextlib.contextmanager
def hold_run(run_dir: Path, env: DistEnv) -> Iterator[None]:
    """Hold `run_dir` for the duration of the block, or raise RunHeld on every rank.

    Under torchrun only rank 0 locks (only it writes the run directory); the other ranks learn
    its outcome, so that a second launch fails on all ranks at once instead of leaving some
    waiting in a collective."""
    fd, refusal = None, None
    if env.is_main:
        try:
            fd = acquire(run_dir)
        except RunHeld as exc:
            refusal = str(exc)
    refusal = broadcast_object(env, refusal)
    if refusal is not None:
        raise RunHeld(refusal)
    try:
        yield
    finally:
        if fd is not None:
            release(run_dir, fd)
