"""Failures a user can fix, reported as one line and a non-zero exit instead of a traceback."""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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


GIB = 2**30
# torch.save reports a failed write without its errno:
# "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
_TORCH_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed writing|inline_container\.cc.*unexpected pos")


def _write_problem(exc: BaseException) -> str | None:
    """What stopped a write, when it was the disk or a file-size limit; None for anything else."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:  # SafetensorError (Rust) names the errno in its message: "... (os error 28)"
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found.group(1)) if found else None
    if code == errno.ENOSPC:
        return "no space left on the disk"
    if code == errno.EDQUOT:
        return "the disk quota is used up"
    if code == errno.EFBIG:
        return "a file grew past the largest size allowed"
    if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILED.search(str(exc)):
        return "torch could not write a file whole (a full disk or a file-size limit)"
    return None


def size(n: float) -> str:
    """Bytes for a reader: "15.0 GiB", "804 KiB"."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def _file_size_limit() -> int | None:
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def _free_space(path: Path) -> str:
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{size(shutil.disk_usage(folder).free)} is free on the disk of {folder}"
    except OSError:
        return f"the free space of {folder}'s disk is unknown"


def _write_failure(exc: BaseException, path: Path | None, needed: int | None) -> UserError | None:
    problem = _write_problem(exc)
    if problem is None:
        return None
    path = getattr(exc, "filename", None) or path
    what = f"{path}" if path else f"a file in {Path.cwd()}"
    wanted = f" (about {size(needed)})" if needed else ""
    room, limit = _free_space(Path(path or ".")), _file_size_limit()
    if limit is not None:
        room += f", and this shell limits a file to {size(limit)}: raise that (`ulimit -f unlimited`) or free space"
    else:
        room += ": free some space there (`dvc gc -w` drops the cache of every result but the workspace's)"
    return UserError(f"cannot write {what}{wanted}: {problem}; {room}, and rerun")


def _disk_error(exc: BaseException, path: Path | None, needed: int | None) -> UserError | None:
    """A write the disk or a file-size limit stopped, here or in what the library's error wraps."""
    for cause in (exc, exc.__cause__, exc.__context__):
        if cause is not None and (error := _write_failure(cause, path, needed)):
            return error
    return None


def _out_of_gpu_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # only a stage that imported torch can run out of GPU memory
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def as_user_error(exc: BaseException, path: Path | None = None, needed: int | None = None) -> UserError | None:
    """A failure the user can fix, whichever line of a stage met it, as one line; None for anything else.

    A full disk (or quota, or file-size limit) says which path, how much was needed if the caller
    knew (`writing`), and how much is free; out of GPU memory outside a stage's own advice
    (`gpu_memory_advice`), for instance while loading a model, says to free the GPU.
    """
    if error := _disk_error(exc, path, needed):
        return error
    if _out_of_gpu_memory(exc):
        tried = re.search(r"Tried to allocate [\d.]+ \w+", str(exc))
        return UserError(f"out of GPU memory{' (' + tried.group(0) + ')' if tried else ''}: another process may "
                         "hold the GPU (`nvidia-smi` lists them); free it and rerun")
    return None


@contextmanager
def writing(path: Path, needed: int | None = None) -> Iterator[None]:
    """Around a large write: a full disk inside the block names `path` and the bytes it needed."""
    try:
        yield
    except Exception as exc:
        if error := _disk_error(exc, path, needed):
            raise error from None
        raise


@contextmanager
def gpu_memory_advice(advice: Callable[[], str]) -> Iterator[None]:
    """Out of GPU memory inside the block becomes one line: `advice()`, the stage's own -S that helps."""
    try:
        yield
    except Exception as exc:
        if _out_of_gpu_memory(exc):
            raise UserError(advice()) from None
        raise


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
    """Wrap a stage's main(): set up logging; a UserError (or a failure as_user_error knows) becomes
    `error: ...` + exit 2; Ctrl-C and SIGTERM one line each and exit 130 and 143, as the shell
    reports a process they stop."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        global _outputs_replaced
        _outputs_replaced = False
        setup_logging()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as exc:  # a full disk, out of GPU memory: one line too; anything else is a bug
            if (error := as_user_error(exc)) is None:
                raise
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as exc:
            sigterm = isinstance(exc, Terminated)
            print(interrupted_line(sigterm), file=sys.stderr)
            raise SystemExit(128 + (signal.SIGTERM if sigterm else signal.SIGINT)) from None

    return run
