"""Validate: check params.yaml and open the data source before any stage replaces an output.

    python -m stages.validate       (or: dvc repro validate)

DVC deletes a stage's outputs just before it runs the stage, so a bad param found inside train
(or an unreadable source found inside prepare) used to cost the last good adapter, metrics and
curves. This cheap first stage depends on the whole params.yaml, so it runs first whenever any
param changed: it validates every param, reads and cleans `data.source` and checks that local
model folders exist. On success it writes the same line to data/validated.txt every time (a
persistent output, so a failure leaves it too), so it never makes anything downstream rerun.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages import paths
from stages.cli import no_arguments
from stages.errors import UserError, stage_entrypoint
from stages.modeling import is_hub_id
from stages.outputs import write_text
from stages.params import load_params
from stages.records import clean_records, read_records

log = logging.getLogger("stages.validate")

VALIDATED_TEXT = "params.yaml is valid and data.source is readable\n"


def check_model_paths(params) -> None:
    """A local model folder that is missing fails here, not after prepare and train have run."""
    for what, name in (("model.name", params.model.name), ("model.base_16bit", params.model.base_16bit)):
        if not is_hub_id(name) and not Path(name).expanduser().is_dir():
            raise UserError(f"{what} = {name}: no such folder; point it at a local model folder or an owner/name hub id")


@stage_entrypoint
def main() -> None:
    params = load_params()
    check_model_paths(params)
    data = params.data
    records = read_records(data.source, data.split, data.revision)
    rows, _, _ = clean_records(records, data.min_chars)
    log.info("params.yaml is valid; %s has %d rows, %d usable", data.source, len(records), len(rows))
    if not paths.VALIDATED.exists() or paths.VALIDATED.read_text(encoding="utf-8") != VALIDATED_TEXT:
        write_text(paths.VALIDATED, VALIDATED_TEXT)


if __name__ == "__main__":
    no_arguments(__spec__.name, __doc__)
    main()
