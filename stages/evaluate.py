"""Evaluate the fine-tuned model: loss, answers to every test question, ROUGE, a review report.

    python -m stages.evaluate       (or: dvc repro evaluate)

Reads models/merged/, the prepared validation and test splits, and the base model's results
(metrics/eval_base.json, metrics/predictions_base.jsonl); writes metrics/eval.json,
metrics/predictions.jsonl (fine-tuned and base answers side by side) and metrics/report.md.
"""

from __future__ import annotations

import json
import logging

from stages import paths
from stages.errors import UserError, stage_entrypoint
from stages.evaluation import evaluate_model
from stages.modeling import load_for_inference, load_tokenizer
from stages.outputs import check_writable, jsonl_text, read_jsonl, staged
from stages.params import load_params
from stages.rouge import ROUGE_TYPES

log = logging.getLogger("stages.evaluate")

HEADLINE = [("validation", "loss"), ("validation", "perplexity"), ("test", "loss"), ("test", "perplexity"),
            *(("test", name) for name in ROUGE_TYPES)]


def side_by_side(predictions: list[dict], base_predictions: list[dict]) -> list[dict]:
    base_by_id = {p["id"]: p for p in base_predictions}
    merged = []
    for prediction in predictions:
        base = base_by_id.get(prediction["id"], {})
        merged.append({
            **prediction,
            "base_answer": base.get("answer"),
            **{f"base_{name}": base.get(name) for name in ROUGE_TYPES},
        })
    return merged


def _quote(text: str | None) -> str:
    return "<br>".join((text or "(none)").splitlines()).replace("|", "\\|")


def report(metrics: dict, base_metrics: dict, records: list[dict], n_examples: int) -> str:
    """Markdown for a code-review page: base vs fine-tuned, then the best and worst answers."""
    lines = ["# Evaluation report", "", f"{metrics['test']['n']} test questions; ROUGE F1 with the "
             f"`{metrics['rouge_tokenizer']['tokenizer']}` tokenizer, mean over questions.", "",
             "| metric | base | fine-tuned | change |", "| --- | ---: | ---: | ---: |"]
    for split, name in HEADLINE:
        tuned, base = metrics[split][name], base_metrics.get(split, {}).get(name)
        change = f"{tuned - base:+.4f}" if base is not None else ""
        base_text = f"{base:.4f}" if base is not None else "n/a"
        lines.append(f"| {split} {name} | {base_text} | {tuned:.4f} | {change} |")
    best = sorted(records, key=lambda r: (-r["rougeL"], r["id"]))[:n_examples]
    worst = sorted(records, key=lambda r: (r["rougeL"], r["id"]))[:n_examples]
    for title, chosen in (("Best", best), ("Worst", worst)):
        lines += ["", f"## {title} {len(chosen)} by fine-tuned ROUGE-L", ""]
        for record in chosen:
            base_rouge = record.get("base_rougeL")
            lines += [
                f"### {record['id']}: {record['question']}", "",
                "| | answer | ROUGE-L |", "| --- | --- | ---: |",
                f"| reference | {_quote(record['reference'])} | |",
                f"| fine-tuned | {_quote(record['answer'])} | {record['rougeL']:.3f} |",
                f"| base | {_quote(record.get('base_answer'))} | "
                f"{'' if base_rouge is None else f'{base_rouge:.3f}'} |", "",
            ]
    return "\n".join(lines) + "\n"


@stage_entrypoint
def main() -> None:
    params = load_params()
    check_writable(paths.PREDICTIONS, paths.REPORT, paths.EVAL_METRICS)
    for needed, how in ((paths.MERGED_DIR / "config.json", "dvc repro merge"),
                        (paths.EVAL_BASE_METRICS, "dvc repro evaluate_base"),
                        (paths.BASE_PREDICTIONS, "dvc repro evaluate_base")):
        if not needed.exists():
            raise UserError(f"{needed} is missing; run `{how}` first")
    base_metrics = json.loads(paths.EVAL_BASE_METRICS.read_text(encoding="utf-8"))
    base_predictions = read_jsonl(paths.BASE_PREDICTIONS)

    tokenizer = load_tokenizer(str(paths.MERGED_DIR), what="models/merged")
    model = load_for_inference(str(paths.MERGED_DIR), what="models/merged")
    metrics, predictions = evaluate_model(model, tokenizer, params)
    records = side_by_side(predictions, base_predictions)

    with staged() as out:  # answers and report first, the metrics that summarise them last
        out.text(paths.PREDICTIONS, jsonl_text(records))
        out.text(paths.REPORT, report(metrics, base_metrics, records, params.eval.report_examples))
        out.json(paths.EVAL_METRICS, metrics)
    log.info("wrote %s, %s and %s", paths.EVAL_METRICS, paths.PREDICTIONS, paths.REPORT)


if __name__ == "__main__":
    main()
