"""Atomic writes: a stage that fails leaves its previous outputs as they were, never half-written.

Every output is first written under a temporary name beside its final path, then renamed over it
(`os.replace` is atomic on one filesystem). Outputs that belong together (an adapter and the
metrics that describe it) are staged together and renamed only once all of them are written, the
artefact before its metrics, so a failure anywhere leaves the old pair. Temporary names carry the
writer's pid; those of a killed run are removed by the next write to the same place.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from stages.errors import UserError

_TAGS = ("tmp", "old")


def _temporary_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Delete temporary siblings of `final` left by runs that were killed (their pid is gone)."""
    removed = []
    for candidate in Path(final).parent.glob(f".{Path(final).name}.*-*"):
        tag, _, pid = candidate.name.rpartition(".")[2].partition("-")
        if tag in _TAGS and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(candidate) if candidate.is_dir() else candidate.unlink()
            removed.append(candidate)
    return removed


def _write_error(path: Path, exc: OSError) -> UserError:
    return UserError(f"cannot write {path}: {exc.strerror or exc}; check that folder's permissions and free disk space")


def check_writable(*finals: Path) -> None:
    """Fail in one line, before any expensive work, when an output's folder cannot be written."""
    for final in finals:
        final = Path(final)
        probe = _temporary_sibling(final, "tmp")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise _write_error(final, exc) from None


class Staged:
    """Outputs written under temporary names, renamed into place together by `publish()`."""

    def __init__(self):
        self._pairs: list[tuple[Path, Path]] = []  # (temporary, final), in publication order

    def _stage(self, final: Path) -> Path:
        final = Path(final)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(final, exc) from None
        remove_stale_temporaries(final)
        tmp = _temporary_sibling(final, "tmp")
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        self._pairs.append((tmp, final))
        return tmp

    def dir(self, final: Path) -> Path:
        """An empty temporary folder that will replace `final`."""
        tmp = self._stage(final)
        tmp.mkdir()
        return tmp

    def text(self, final: Path, text: str) -> None:
        tmp = self._stage(final)
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise _write_error(final, exc) from None

    def json(self, final: Path, obj) -> None:
        self.text(final, dumps_json(obj))

    def publish(self) -> None:
        for tmp, final in self._pairs:
            old = _temporary_sibling(final, "old")
            try:
                if tmp.is_dir() and final.exists():
                    os.replace(final, old)  # a folder cannot be renamed over a non-empty one
                os.replace(tmp, final)
            except OSError as exc:
                raise _write_error(final, exc) from None
            shutil.rmtree(old, ignore_errors=True)
        self._pairs = []

    def discard(self) -> None:
        for tmp, _ in self._pairs:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        self._pairs = []


@contextmanager
def staged() -> Iterator[Staged]:
    """Stage outputs inside the block; on success they are published in the order staged."""
    outputs = Staged()
    try:
        yield outputs
    except BaseException:
        outputs.discard()
        raise
    try:
        outputs.publish()
    finally:
        outputs.discard()


def write_text(path: Path, text: str) -> None:
    with staged() as out:
        out.text(path, text)


def dumps_json(obj) -> str:
    # Sorted keys and a trailing newline: the same metrics always give the same bytes.
    return json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


def write_json(path: Path, obj) -> None:
    write_text(path, dumps_json(obj))


def jsonl_text(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final`, on failure it is removed."""
    with staged() as out:
        yield out.dir(final)
