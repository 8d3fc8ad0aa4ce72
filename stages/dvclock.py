"""Another DVC command holding the project's lock: which command it is, and a bounded wait for it.

DVC takes the repository lock (.dvc/tmp/lock, with the holder's pid) for its own work, and while
`dvc repro` runs a stage's command it holds read and write locks on that stage's deps and
outputs instead (.dvc/tmp/rwlock: the pid and command line per path). A command that meets
either lock fails with a multi-line dvc.lock.LockError.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

from stages.errors import UserError

log = logging.getLogger("stages")
T = TypeVar("T")
WAIT_S = 30  # seconds: outlasts DVC's own work between two stages, not a stage's run


def _locked_by(tmp_dir: Path) -> dict[int, str | None]:
    """pid -> command line (None where unrecorded) of whoever the lock files name."""
    found: dict[int, str | None] = {}
    try:
        found[int((tmp_dir / "lock").read_text().split()[0])] = None
    except (OSError, ValueError, IndexError):
        pass
    try:
        rwlock = json.loads((tmp_dir / "rwlock").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        rwlock = {}
    for infos in [*rwlock.get("write", {}).values(), *rwlock.get("read", {}).values()]:
        for info in infos if isinstance(infos, list) else [infos]:
            found[int(info["pid"])] = info["cmd"]
    return found


def holders(tmp_dir: Path = Path(".dvc/tmp")) -> list[str]:
    """The live processes DVC's lock files name, as "`dvc repro` (pid 1234)"."""
    import psutil

    described = []
    for pid, cmd in _locked_by(tmp_dir).items():
        if pid == os.getpid() or not psutil.pid_exists(pid):
            continue
        if cmd is None:
            try:
                cmd = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                cmd = "?"
        program, _, arguments = " ".join(cmd.split()).partition(" ")  # one line, whatever the arguments hold
        command = " ".join(filter(None, (Path(program).name, arguments)))  # "/venv/bin/dvc repro" -> "dvc repro"
        described.append(f"`{command if len(command) <= 80 else command[:79] + '…'}` (pid {pid})")
    return described


def when_free(call: Callable[[], T], needed_for: str, wait_s: float | None = None) -> T:
    """call(), retried for up to WAIT_S seconds while another DVC command holds the lock it needs."""
    from dvc.lock import LockError

    wait_s = WAIT_S if wait_s is None else wait_s
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            return call()
        except LockError:
            who = " and ".join(holders()) or "another DVC command"
            if time.monotonic() >= deadline:
                raise UserError(f"{who} holds DVC's lock on this project, and {needed_for} (waited {wait_s:.0f}s): "
                                "rerun when it has finished") from None
            if not said:
                log.info("%s holds DVC's lock on this project; waiting up to %.0fs for it", who, wait_s)
                said = True
            time.sleep(1)
