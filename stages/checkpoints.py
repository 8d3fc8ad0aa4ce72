"""Resumable training: which checkpoint, if any, an interrupted train stage continues from.

Checkpoints live in models/checkpoints/, outside DVC's outputs (git- and DVC-ignored), so
switching between results never marks train as changed. They exist only while a run is
unfinished: the train stage deletes them once its outputs are written, so a finished run never
leaves a state to "resume". A rerun resumes only when everything that decides the result is the
same as in the interrupted run (the fingerprint: params, prepared data, the train stage's code
and the library versions), and only from a checkpoint the Trainer finished saving (marked by
`mark_complete` after the save); a partial one, left by a kill during the save, is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from stages import paths

log = logging.getLogger("stages.train")

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth")
FINGERPRINT_FILE = "fingerprint.txt"
COMPLETE_MARK = "complete.json"  # written into a checkpoint folder after the Trainer has saved it
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def stage_code(stage: str = "train") -> list[Path]:
    """The stage's own modules, as dvc.yaml lists them among its deps.

    DVC runs stages from the project root, where dvc.yaml is; a stage run from another folder
    (the benchmarks' scratch workspaces) fingerprints the project its code comes from.
    """
    root = Path.cwd() if paths.DVC_YAML.exists() else Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / paths.DVC_YAML).read_text(encoding="utf-8"))["stages"][stage]
    return sorted(root / dep for dep in spec["deps"] if str(dep).endswith(".py"))


def run_fingerprint(params) -> str:
    """What a checkpoint must match to be resumed: params, prepared data, code, library versions."""
    model = params.model
    settings = (params.seed, model.name, model.max_seq_length, model.load_in_4bit, model.backend,
                params.lora, params.train, sorted(library_versions().items()))
    digest = hashlib.sha256(repr(settings).encode())
    for path in [paths.split_file("train"), paths.split_file("validation"), *stage_code()]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def mark_complete(checkpoint_dir: Path, step: int) -> None:
    """Called after the Trainer saved checkpoint-<step>: only marked checkpoints are resumed."""
    (Path(checkpoint_dir) / COMPLETE_MARK).write_text(json.dumps({"step": step}) + "\n", encoding="utf-8")


def last_complete_checkpoint(root: Path = paths.CHECKPOINT_DIR) -> Path | None:
    found = []
    for folder in Path(root).glob("checkpoint-*"):
        match = _CHECKPOINT.match(folder.name)
        if match and folder.is_dir():
            found.append((int(match.group(1)), folder))
    for step, folder in sorted(found, reverse=True):
        if (folder / COMPLETE_MARK).exists() and (folder / "trainer_state.json").exists():
            return folder
        log.warning("skipping %s: its save did not finish (the run was stopped while writing it)", folder)
    return None


def checkpoint_to_resume(fingerprint: str) -> str | None:
    """The last complete checkpoint of an interrupted run with the same fingerprint; else start clean."""
    stamp = paths.CHECKPOINT_DIR / FINGERPRINT_FILE
    if stamp.exists() and stamp.read_text() == fingerprint:
        last = last_complete_checkpoint()
        if last is not None:
            log.info("resuming from %s (an interrupted run with the same params, data, code and libraries)", last)
            return str(last)
    elif stamp.exists():
        log.info("not resuming %s: params, data, code or libraries changed since it was written", paths.CHECKPOINT_DIR)
    clear()
    paths.CHECKPOINT_DIR.mkdir(parents=True)
    stamp.write_text(fingerprint)
    return None


def clear() -> None:
    """Remove every checkpoint: called when a run has written its outputs, and before a clean start."""
    shutil.rmtree(paths.CHECKPOINT_DIR, ignore_errors=True)
