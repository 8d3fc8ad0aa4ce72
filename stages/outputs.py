"""Atomic writes: a stage that fails leaves its previous outputs as they were, never half-written.

Every output is first written under a temporary name beside its final path, then renamed over it
(`os.replace` is atomic on one filesystem). Outputs that belong together (an adapter and the
metrics that describe it) are staged together and renamed only once all of them are written, the
artefact before its metrics, so a failure anywhere leaves the old pair. Temporary names carry the
writer's pid; those of a killed run are removed by the next write to the same place.

A measurement of how the outputs were made (time, speed, memory: the cost files, declared
`persist` so DVC leaves them in place while the stage runs) is replaced only when the run made
something new. A rerun whose other outputs hash exactly as dvc.lock records them keeps the
measurement dvc.lock records too, so a bit-identical rerun leaves git, dvc.lock and
`dvc metrics diff` clean; a run with other params, data, code, libraries or device writes other
outputs (the info file names code, libraries and device) and so a new measurement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from stages import paths
from stages.errors import UserError

log = logging.getLogger("stages.outputs")
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
        self._measurements: set[Path] = set()  # finals kept as they are when nothing else changed

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

    def measurement(self, final: Path, obj) -> None:
        """JSON describing how the other outputs were made; see the module docstring for when it is kept."""
        self.json(final, obj)
        self._measurements.add(Path(final))

    def _reproduced(self) -> bool:
        """Every output hashes as dvc.lock records it: the new ones staged, the measurements in place."""
        recorded = locked_hashes()  # DVC has deleted the other outputs' old versions before the run
        for tmp, final in self._pairs:
            current = final if final in self._measurements else tmp
            if not current.exists() or dvc_md5(current) != recorded.get(final.as_posix()):
                return False
        return True

    def publish(self) -> None:
        if self._measurements and self._reproduced():
            for tmp, final in self._pairs:
                if final in self._measurements:
                    tmp.unlink(missing_ok=True)  # the earlier measurement of these same outputs stays
                    log.info("kept %s as dvc.lock records it: every other output reproduces dvc.lock exactly, "
                             "so this run's new measurement is not written", final)
            self._pairs = [(tmp, final) for tmp, final in self._pairs if final not in self._measurements]
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


def locked_hashes(lock_file: Path = paths.DVC_LOCK) -> dict[str, str]:
    """Output path -> md5, as dvc.lock records them for every stage (empty without a dvc.lock)."""
    import yaml

    if not lock_file.exists():
        return {}
    stages = (yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {out["path"]: out.get("md5") for stage in stages.values() for out in stage.get("outs", [])}


def dvc_md5(path: Path) -> str:
    """DVC's md5 of a file, or of a folder (the md5 of its listing, '.dir'), as dvc.lock writes it."""
    path = Path(path)
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        tree.add(file.relative_to(path).parts, Meta(size=file.stat().st_size),
                 HashInfo("md5", hashlib.md5(file.read_bytes()).hexdigest()))
    tree.digest()
    return tree.hash_info.value


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
