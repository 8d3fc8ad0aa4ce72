"""Evaluate the fine-tuned model against the base: loss, decisions, answers, ROUGE, a review report.

    python -m stages.evaluate       (or: dvc repro evaluate)

Reads models/merged/, the prepared validation and test splits, and the base model's results
(metrics/eval_base.json, metrics/predictions_base.jsonl); writes metrics/eval.json (quality
under `tuned`, fine-tuned minus base with paired bootstrap intervals under `vs_base`),
metrics/cost/evaluate.json, metrics/info/evaluate.json, metrics/predictions.jsonl (fine-tuned
and base side by side), the plot data in metrics/eval_plots/ and metrics/report.md.
"""

from __future__ import annotations

import json
import logging

from stages import paths
from stages.bootstrap import paired_deltas
from stages.cli import no_arguments
from stages.errors import UserError, stage_entrypoint
from stages.evaluation import evaluate_model
from stages.modeling import load_for_inference, load_tokenizer
from stages.outputs import check_writable, jsonl_text, read_jsonl, staged
from stages.params import load_params
from stages.plots import top_level_files
from stages.report import decision_plot, report, rouge_plot, run_identity, side_by_side

log = logging.getLogger("stages.evaluate")


def read_base() -> tuple[dict, list[dict]]:
    """The base model's quality metrics and per-question predictions, from evaluate_base."""
    for needed, how in ((paths.EVAL_BASE_METRICS, "dvc repro evaluate_base"),
                        (paths.BASE_PREDICTIONS, "dvc repro evaluate_base")):
        if not needed.exists():
            raise UserError(f"{needed} is missing; run `{how}` first")
    base = json.loads(paths.EVAL_BASE_METRICS.read_text(encoding="utf-8"))
    predictions = read_jsonl(paths.BASE_PREDICTIONS)
    if "base" not in base or not all("answer_nll" in p for p in predictions):
        raise UserError(f"{paths.EVAL_BASE_METRICS} comes from an older version; run `dvc repro evaluate_base`")
    return base["base"], predictions


@stage_entrypoint
def main() -> None:
    params = load_params()
    check_writable(paths.PREDICTIONS, paths.REPORT, paths.EVAL_METRICS, paths.EVAL_INFO, paths.EVAL_COST,
                   paths.DECISION_PLOT, paths.ROUGE_PLOT)
    if not (paths.MERGED_DIR / "config.json").exists():
        raise UserError(f"{paths.MERGED_DIR} is missing; run `dvc repro merge` first")
    base_quality, base_predictions = read_base()

    tokenizer = load_tokenizer(str(paths.MERGED_DIR), what="models/merged")
    model = load_for_inference(str(paths.MERGED_DIR), what="models/merged", tokenizer=tokenizer)
    result = evaluate_model(model, tokenizer, params)
    try:
        records = side_by_side(result.predictions, base_predictions)
    except ValueError:
        raise UserError(f"{paths.BASE_PREDICTIONS} holds other test questions; run `dvc repro evaluate_base`") from None
    deltas = paired_deltas(records, params.eval.bootstrap_samples, params.seed)
    plots = {title: (paths.PLOTS_DIR.relative_to(paths.REPORT.parent) / name).as_posix()
             for title, name in top_level_files().items()}  # drawn by the plots stage, next after this one
    text = report(result.quality, base_quality, deltas, records, result.info, run_identity(),
                  params.eval.report_examples, params.eval.bootstrap_samples, plots)

    # answers, plots and report first; the metrics that summarise them last, all renamed together
    with staged() as out:
        out.text(paths.PREDICTIONS, jsonl_text(records))
        out.json(paths.DECISION_PLOT, decision_plot(records))
        out.json(paths.ROUGE_PLOT, rouge_plot(records))
        out.text(paths.REPORT, text)
        out.json(paths.EVAL_INFO, result.info)
        out.measurement(paths.EVAL_COST, {"evaluate": result.cost})
        out.json(paths.EVAL_METRICS, {"tuned": result.quality, "vs_base": {"test": deltas}})
    log.info("wrote %s, %s and %s", paths.EVAL_METRICS, paths.PREDICTIONS, paths.REPORT)


if __name__ == "__main__":
    no_arguments(__spec__.name, __doc__)
    main()
