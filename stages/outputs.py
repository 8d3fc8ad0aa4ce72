"""Atomic writes: a stage that fails leaves its previous outputs as they were, never half-written.

Every output is declared `persist: true` in dvc.yaml, so DVC leaves the previous version in place
while a stage runs, and the stage replaces it only here. Each output is first written under a
temporary name beside its final path. A stage's outputs are staged together and published only
once all of them are written, as one transaction: a journal (models/.publishing-<pid>.json) lists
them, every previous version is moved aside before the new one is renamed into place, and the
journal is marked committed once all are in place. Ctrl-C and SIGTERM wait for the renames (a few
milliseconds); an error in the middle puts every previous version back; after a kill (SIGKILL,
power loss) the next stage to write outputs finds the journal and rolls the transaction back (not
committed) or finishes it (committed). So every output is always either its previous version or
the new one, never a mix of the two runs. Temporary names carry the writer's pid; those of a
killed run are removed by the next write to the same place.

A measurement of how the outputs were made (time, speed, memory: the cost files) is replaced
only when the run made something new. A rerun whose other outputs hash exactly as dvc.lock
records them keeps the measurement dvc.lock records too, so a bit-identical rerun leaves git,
dvc.lock and `dvc metrics diff` clean; a run with other params, data, code, libraries or device writes other
outputs (the info file names code, libraries and device) and so a new measurement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from stages import paths
from stages.errors import UserError, as_user_error, note_outputs_replaced

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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Delete temporary siblings of `final` left by runs that were killed (their pid is gone).

    An interrupted publication is settled first: its moved-aside previous versions go back.
    """
    recover_interrupted_publications()
    removed = []
    for candidate in Path(final).parent.glob(f".{Path(final).name}.*-*"):
        tag, _, pid = candidate.name.rpartition(".")[2].partition("-")
        if tag in _TAGS and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(candidate)
            removed.append(candidate)
    return removed


def _write_error(path: Path, exc: OSError) -> UserError:
    """A full disk says how much is free there (as_user_error); anything else names the path and the reason."""
    return as_user_error(exc, path) or UserError(
        f"cannot write {path}: {exc.strerror or exc}; check that folder's permissions and free disk space")


def check_writable(*finals: Path) -> None:
    """Fail in one line, before any expensive work, when an output's folder cannot be written."""
    recover_interrupted_publications()
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
        recorded = locked_hashes()  # what the previous run's outputs hashed to, as DVC recorded them
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
        if self._pairs:
            _Publication(self._pairs).run()
        self._pairs = []

    def discard(self) -> None:
        for tmp, _ in self._pairs:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        self._pairs = []


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends (a few renames), then act as they would have."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a pending signal is delivered here


class _Publication:
    """Renames staged outputs into place all together or not at all; see the module docstring."""

    def __init__(self, pairs: list[tuple[Path, Path]], journal: Path | None = None):
        self.journal = journal or paths.PUBLISH_JOURNALS / f".publishing-{os.getpid()}.json"
        # (temporary, final, where the previous version goes, whether there was one)
        self.moves = [(tmp, final, _temporary_sibling(final, "old"), final.exists() or final.is_symlink())
                      for tmp, final in pairs]

    @property
    def commit_mark(self) -> Path:
        return self.journal.with_suffix(".committed")

    def _write_journal(self) -> None:
        """Flushed to disk before the first rename: a journal that does not parse means none had begun."""
        entries = [[str(tmp), str(final), str(old), existed] for tmp, final, old, existed in self.moves]
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(entries, ensure_ascii=False))
            handle.flush()
            os.fsync(handle.fileno())

    @classmethod
    def read(cls, journal: Path) -> "_Publication":
        publication = cls([], journal=journal)
        entries = json.loads(journal.read_text(encoding="utf-8"))
        publication.moves = [(Path(tmp), Path(final), Path(old), existed) for tmp, final, old, existed in entries]
        return publication

    def run(self) -> None:
        committed, current = False, self.journal
        try:
            with _signals_held():  # a signal that came meanwhile is raised as this block ends
                self._write_journal()
                try:
                    for tmp, final, old, existed in self.moves:
                        current = final
                        if existed:
                            os.replace(final, old)  # a folder cannot be renamed over a non-empty one
                        os.replace(tmp, final)
                    current = self.commit_mark
                    current.touch()
                except BaseException:
                    self.roll_back()
                    raise
                committed = True
                note_outputs_replaced()
        except OSError as exc:
            raise _write_error(current, exc) from None
        finally:
            if committed:
                self.finish()

    def roll_back(self) -> None:
        """Every output back to its previous version (or absent, if it had none)."""
        for tmp, final, old, existed in reversed(self.moves):
            if old.exists() or old.is_symlink():
                _remove(final)
                os.replace(old, final)
            elif not existed and not (tmp.exists() or tmp.is_symlink()):
                _remove(final)  # this run's new output, with no earlier one to go back to
            _remove(tmp)
        self.commit_mark.unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)

    def finish(self) -> None:
        """The new versions are in place: delete the previous ones, then the journal."""
        for _, _, old, _ in self.moves:
            _remove(old)
        self.journal.unlink(missing_ok=True)
        self.commit_mark.unlink(missing_ok=True)


def recover_interrupted_publications(journal_dir: Path | None = None) -> None:
    """Settle what a killed stage's publication left: back to before it, or on to its end if committed."""
    journal_dir = paths.PUBLISH_JOURNALS if journal_dir is None else journal_dir
    for journal in sorted(journal_dir.glob(".publishing-*.json")):
        pid = journal.name.removeprefix(".publishing-").removesuffix(".json")
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            publication = _Publication.read(journal)
        except (ValueError, TypeError):  # cut short while written: no rename had begun
            journal.unlink()
            continue
        if publication.commit_mark.exists():
            publication.finish()
            log.warning("a stage was stopped just after replacing its outputs: removed their previous versions")
        else:
            publication.roll_back()
            log.warning("a stage was stopped while replacing its outputs: put every previous version back (%s)",
                        ", ".join(str(final) for _, final, _, _ in publication.moves))


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
