"""Resumable training: which checkpoint, if any, an interrupted train stage continues from.

Checkpoints live in models/checkpoints (persisted, never cached by DVC) with a fingerprint of
the params and data that produced them; a rerun with the same fingerprint resumes from the last
checkpoint, any change starts clean.
"""

from __future__ import annotations

import hashlib
import logging
import shutil

from stages import paths

log = logging.getLogger("stages.train")


def run_fingerprint(params) -> str:
    """What a checkpoint must match to be resumed: the training params and the prepared data."""
    model = params.model
    settings = (params.seed, model.name, model.max_seq_length, model.load_in_4bit, model.backend,
                params.lora, params.train)
    digest = hashlib.sha256(repr(settings).encode())
    for split in ("train", "validation"):
        digest.update(paths.split_file(split).read_bytes())
    return digest.hexdigest()


def checkpoint_to_resume(fingerprint: str) -> str | None:
    """The last checkpoint of an interrupted run with the same fingerprint; else start clean."""
    from transformers.trainer_utils import get_last_checkpoint

    stamp = paths.CHECKPOINT_DIR / "fingerprint.txt"
    if stamp.exists() and stamp.read_text() == fingerprint:
        last = get_last_checkpoint(str(paths.CHECKPOINT_DIR))
        if last:
            log.info("resuming from %s (same params and data)", last)
            return last
    shutil.rmtree(paths.CHECKPOINT_DIR, ignore_errors=True)
    paths.CHECKPOINT_DIR.mkdir(parents=True)
    stamp.write_text(fingerprint)
    return None
