"""Resumable training: which checkpoint, if any, an interrupted train stage continues from.

Checkpoints live in models/checkpoints/, outside DVC's outputs (git- and DVC-ignored), so
switching between results never marks train as changed. They exist only while a run is
unfinished: the train stage deletes them once its outputs are written, so a finished run never
leaves a state to "resume". A rerun resumes only when everything that decides the result is the
same as in the interrupted run (the fingerprint: params, prepared data, the train stage's code
and the library versions), and only from a checkpoint the Trainer finished saving (marked by
`mark_complete` after the save); a partial one, left by a kill during the save, is skipped,
and so is one whose files no longer load (cut short by a full disk, damaged by a copy): it is
removed, and the run resumes from the one before it or starts from step 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import zipfile
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


def _load_problem(path: Path) -> str | None:
    """Why the Trainer could not read this checkpoint file as it reads it on resume, or None."""
    import torch
    from safetensors import safe_open
    from transformers.trainer_pt_utils import safe_globals

    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as weights:  # checks the header against the file's size
                weights.keys()
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its directory at the end
            return f"{path.name} does not load (not a whole torch file: cut short or overwritten)"
        else:
            with safe_globals():  # the numpy types of rng_state.pth, as the Trainer allows them
                torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever the reason, the Trainer would stop on it: report it, skip the checkpoint
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        return f"{path.name} does not load ({reason.removeprefix('Error while deserializing header: ')})"
    return None


def unloadable(folder: Path) -> str | None:
    """Why resuming from `folder` would fail or differ, or None when everything the Trainer reads loads.

    The Trainer reads the adapter weights, optimizer.pt, scheduler.pt, rng_state*.pth and
    trainer_state.json (training_args.bin, a pickle of arbitrary objects, it never reads back).
    A missing optimizer or scheduler state would not fail: the run would silently differ.
    """
    folder = Path(folder)
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file():
            return f"{name} is missing"
    if not any(folder.glob("*.safetensors")):
        return "its weights (*.safetensors) are missing"
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.json"), *folder.glob("*.pt"),
                    *folder.glob("rng_state*.pth")])
    return next((problem for problem in map(_load_problem, files) if problem), None)


def last_complete_checkpoint(root: Path = paths.CHECKPOINT_DIR) -> Path | None:
    """The newest checkpoint the Trainer finished saving and can load; unloadable ones are removed.

    One warning per checkpoint skipped, saying why and what the run does instead.
    """
    found = []
    for folder in Path(root).glob("checkpoint-*"):
        match = _CHECKPOINT.match(folder.name)
        if match and folder.is_dir():
            found.append((int(match.group(1)), folder))
    skipped, resumable = [], None
    for step, folder in sorted(found, reverse=True):
        if not ((folder / COMPLETE_MARK).exists() and (folder / "trainer_state.json").exists()):
            skipped.append((folder, "its save did not finish (the run was stopped while writing it)"))
        elif problem := unloadable(folder):
            # Removed, not kept: the Trainer saves that step into the same folder again, where a
            # stale complete mark would vouch for a save that a kill left half done.
            shutil.rmtree(folder)
            skipped.append((folder, f"{problem}; removed it"))
        else:
            resumable = folder
            break
    instead = f"resuming from {resumable.name}" if resumable else \
        "no complete checkpoint left: training starts from step 0"
    for folder, why in skipped:
        log.warning("skipping %s: %s; %s", folder, why, instead)
    return resumable


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
