"""Build a cached folder once, however many processes ask for it at the same time.

A grid starts several runs at once on one ``.cache``; each needs the same converted model and the same
tokenised data. The first to take an exclusive lock on ``<target>.lock`` builds into a temporary folder
of its own and renames it into place, which is atomic, so ``<target>`` is either absent or complete.
Whoever gets the lock after it finds ``<target>`` ready and reuses it:

    process A: lock ── build into <target>.tmp-<pid>-<rand> ── rename to <target> ── unlock
    process B: lock (waits) ─────────────────────────────────────────────────────── finds <target>: reuse
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

WAIT_LOG_S = 5.0
"""Seconds a process waits for the lock before it says (once) whom it waits for."""


@contextmanager
def _exclusive(lock_path: Path, target: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the kernel drops it if the holder dies."""
    with open(lock_path, "a") as f:
        deadline = time.monotonic() + WAIT_LOG_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("waiting for another process building %s", target)
                    fcntl.flock(f, fcntl.LOCK_EX)
                    break
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None], *, marker: str) -> bool:
    """Make sure the folder ``target`` exists, calling ``build`` at most once across processes.

    Args:
        target: the folder to create.
        build: writes the folder's contents into the (empty, not yet existing) folder it is given.
        marker: a file that ``build`` always writes; ``target`` is ready when ``target / marker`` exists.

    Returns:
        ``True`` when this call built ``target``, ``False`` when it was already there (or another
        process built it while this one waited).
    """
    if (target / marker).is_file():  # the rename is atomic: a ready target is a complete one
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.with_name(target.name + ".lock"), target):
        if (target / marker).is_file():
            return False
        # Only the lock holder writes temporary folders, so any left over here belong to a killed
        # process; so does a target without its marker (a cache written before this module existed).
        for stale in glob.glob(glob.escape(str(target)) + ".tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            build(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True
