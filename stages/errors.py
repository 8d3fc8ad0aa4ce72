"""Failures a user can fix, reported as one line and a non-zero exit instead of a traceback."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable

log = logging.getLogger("stages")


class UserError(Exception):
    """A problem with the user's params, data, machine or environment, with what to do about it."""


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


INTERRUPTED = (
    "interrupted: no output was replaced; rerun `dvc repro` to continue (train resumes from its last "
    "complete checkpoint when params, data and code are unchanged)"
)


def stage_entrypoint(main: Callable[..., None]) -> Callable[..., None]:
    """Wrap a stage's main(): set up logging; a UserError becomes `error: ...` + exit 2, Ctrl-C one line + 130."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        setup_logging()
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            raise SystemExit(130) from None

    return run
