"""Validate: check params.yaml, the machine, the models and the data before any stage replaces an output.

    python -m stages.validate       (or: dvc repro validate)

DVC deletes a stage's outputs just before it runs the stage, so a bad param found inside train
(or an unreadable source found inside prepare) used to cost the last good adapter, metrics and
curves. This cheap first stage depends on the whole params.yaml, so it runs first whenever any
param changed: it validates every param, reads and cleans `data.source` and counts its splits as
prepare does, and checks what the params ask of this machine and of the models
(stages/preflight.py), without loading any weights. On success it writes the same line to data/validated.txt every time (a
persistent output, so a failure leaves it too), so it never makes anything downstream rerun.
"""

from __future__ import annotations

import logging

from stages import paths, preflight
from stages.cli import no_arguments
from stages.errors import stage_entrypoint
from stages.outputs import write_text
from stages.params import load_params
from stages.records import clean_records, read_records, split_counts

log = logging.getLogger("stages.validate")

VALIDATED_TEXT = "params.yaml is valid and data.source is readable\n"


@stage_entrypoint
def main() -> None:
    params = load_params()
    data = params.data
    records = read_records(data.source, data.split, data.revision)
    rows, dropped, _ = clean_records(records, data.min_chars)
    n_train, n_val, n_test = split_counts(len(rows), data.val_size, data.test_size, dropped)
    preflight.check_batch_sizes(params, n_train, len(rows))
    configs = preflight.model_configs(params)
    preflight.check_model_limits(params, configs)
    preflight.check_lora_targets(params, configs)
    preflight.check_machine(params)
    preflight.check_outputs_writable()
    log.info("params.yaml is valid; %s has %d rows, %d usable: train/validation/test at most %d/%d/%d",
             data.source, len(records), len(rows), n_train, n_val, n_test)
    if not paths.VALIDATED.exists() or paths.VALIDATED.read_text(encoding="utf-8") != VALIDATED_TEXT:
        write_text(paths.VALIDATED, VALIDATED_TEXT)


if __name__ == "__main__":
    no_arguments(__spec__.name, __doc__)
    main()
