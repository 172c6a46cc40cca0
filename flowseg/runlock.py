"""One writer per run folder: a training run holds RUN/run.lock from start to end.

The lock is an flock on that file. The kernel drops it when the holding process ends, however it
ends, so a run killed with SIGKILL leaves the file behind but not the lock, and the next run takes
over at once: there is no pid to check and no timeout to wait for. The file names its holder (pid,
host, start time) so that a refused run can say who holds the folder; a clean release empties it,
so a holder found in the file by a run that did get the lock is one that ended without releasing it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

LOCK_FILE = "run.lock"


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str  # local time, ISO 8601

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"


def _read_holder(fd: int) -> Holder | None:
    """The holder written in the lock file, or None when it is empty or not a holder record."""
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return None


class RunLock:
    """`with RunLock(run_dir) as lock:` holds the folder or raises RunFolderBusy naming the holder.

    lock.stale is the holder a killed run left in the file (None after a clean release).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.stale: Holder | None = None
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            # a holder that has the lock but has not yet written its record is starting this instant
            who = holder or "a process that is just starting"
            raise RunFolderBusy(f"run folder {self.path.parent} is in use by another training run ({who}); "
                                "wait for it to end, or set train.out_dir to another folder") from None
        except OSError as error:
            os.close(fd)
            raise OSError(f"cannot lock run folder {self.path.parent} ({self.path}): "
                          f"{error.strerror or error}") from None
        self.stale = _read_holder(fd)
        me = Holder(os.getpid(), socket.gethostname(), datetime.now().astimezone().isoformat(timespec="seconds"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(asdict(me)).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        fd, self._fd = self._fd, None
        os.ftruncate(fd, 0)  # a clean release: the next holder finds no stale record
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
