"""Failures a user can fix, reported as one line and a non-zero exit instead of a traceback."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from typing import Callable

log = logging.getLogger("stages")


class UserError(Exception):
    """A problem with the user's params, data, machine or environment, with what to do about it."""


def _not_the_unsized_dataset_note(record: logging.LogRecord) -> bool:
    """accelerate's "[RANK 0] The used dataset had no length, returning gathered tensors..." (INFO).

    Accelerator.gather_for_metrics logs it at the end of a data loader that reports no remainder,
    which is what a resumed train run iterates (seen 8 times in one resumed run's log). TRL's
    SFTTrainer gathers its token accuracy and entropy that way on every step; this pipeline
    records neither. Only that note is dropped; accelerate's other messages stay.
    """
    return "The used dataset had no length" not in record.getMessage()


def progress_bars() -> bool:
    """Progress bars only on a terminal: in a log file (`dvc repro 2> log`, a batch job) their
    carriage-return updates would run into the log records."""
    return sys.stderr.isatty()


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # bitsandbytes warns on import about its CPU 4-bit kernels, which this pipeline never uses
    # (4-bit needs CUDA here): noise in every CPU log.
    logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)
    accelerate_log = logging.getLogger("accelerate.accelerator")
    if _not_the_unsized_dataset_note not in accelerate_log.filters:
        accelerate_log.addFilter(_not_the_unsized_dataset_note)
    if not progress_bars():
        # The libraries' own bars (datasets' map, transformers' weight loading, the hub's downloads,
        # any other tqdm) read these when imported, which a stage does only after this; its own
        # bars and the Trainer's ask progress_bars(). Processes a stage launches inherit them.
        for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(name, "1")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a batch scheduler's time limit), raised where Ctrl-C would be, so it stops the same way."""


def _terminate(signum, frame):
    raise Terminated()


_outputs_replaced = False  # set by stages.outputs once this process has put new outputs in place


def note_outputs_replaced() -> None:
    global _outputs_replaced
    _outputs_replaced = True


def interrupted_line(sigterm: bool) -> str:
    what = "terminated (SIGTERM)" if sigterm else "interrupted"
    if _outputs_replaced:
        return (f"{what} after this stage had written its new outputs, complete, which dvc.lock does not record "
                "yet: run `dvc commit` to record them, or `dvc repro` to run the stage again")
    return (f"{what}: no output was replaced; rerun `dvc repro` to continue (train resumes from its last "
            "complete checkpoint when params, data and code are unchanged)")


def stage_entrypoint(main: Callable[..., None]) -> Callable[..., None]:
    """Wrap a stage's main(): set up logging; a UserError becomes `error: ...` + exit 2; Ctrl-C and
    SIGTERM one line each and exit 130 and 143, as the shell reports a process they stop."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        setup_logging()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as exc:
            sigterm = isinstance(exc, Terminated)
            print(interrupted_line(sigterm), file=sys.stderr)
            raise SystemExit(128 + (signal.SIGTERM if sigterm else signal.SIGINT)) from None

    return run
