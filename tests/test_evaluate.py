"""Evaluation: answer-token loss, batched generation, the metrics files and the report."""

import json
import math

import pytest
import torch

from stages import paths
from stages.evaluation import answer_loss, generate_answers
from stages.modeling import load_for_inference, load_tokenizer
from stages.outputs import read_jsonl
from stages.params import load_params
from stages.prompt import IGNORE_INDEX, tokenize_example


@pytest.fixture(scope="module")
def merged(pipeline_run):
    directory = str(pipeline_run / paths.MERGED_DIR)
    return load_for_inference(directory, "models/merged"), load_tokenizer(directory)


def _rows(pipeline_run, split):
    return read_jsonl(pipeline_run / paths.split_file(split))


def test_loss_equals_a_manual_computation(pipeline_run, merged):
    model, tokenizer = merged
    rows = _rows(pipeline_run, "validation")
    measured = answer_loss(model, tokenizer, rows, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:  # one row at a time, transformers' own mean loss over the answer tokens
            example = tokenize_example(tokenizer, row["prompt"], row["completion"])
            n_answer = sum(label != IGNORE_INDEX for label in example["labels"][1:])
            output = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]]))
            total += output.loss.item() * n_answer
            count += n_answer
    assert measured["answer_tokens"] == count
    assert measured["loss"] == pytest.approx(total / count, rel=1e-5)
    assert measured["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_batched_and_one_at_a_time_greedy_answers_are_the_same(pipeline_run, merged):
    model, tokenizer = merged
    eval_params = load_params(pipeline_run / "params.yaml").eval
    prompts = [row["prompt"] for row in _rows(pipeline_run, "test")]
    batched, stats = generate_answers(model, tokenizer, prompts, eval_params.model_copy(update={"batch_size": 4}), 0)
    single, _ = generate_answers(model, tokenizer, prompts, eval_params.model_copy(update={"batch_size": 1}), 0)
    assert batched == single
    assert all(answers for answers in batched)
    assert 0 < stats["mean_new_tokens"] <= eval_params.max_new_tokens


QUALITY_KEYS = {
    "validation": {"loss", "perplexity"},
    "test": {"loss", "perplexity", "rouge1", "rouge2", "rougeL", "accuracy", "macro_f1", "cut_off"},
}
DELTA_KEYS = {"loss", "rouge1", "rouge2", "rougeL", "accuracy"}


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}.{key}" if prefix else key).items()}


@pytest.mark.parametrize("name, top", [("eval.json", "tuned"), ("eval_base.json", "base")])
def test_metrics_files_hold_only_quality_numbers_under_unique_names(pipeline_run, name, top):
    metrics = _json(pipeline_run / "metrics" / name)
    assert {section: set(keys) for section, keys in metrics[top].items()} == QUALITY_KEYS
    assert all(isinstance(value, (int, float)) and not isinstance(value, bool)
               for value in _flat(metrics).values())
    assert all(0.0 <= metrics[top]["test"][k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL", "accuracy", "cut_off"))
    assert set(metrics) == ({"tuned", "vs_base"} if top == "tuned" else {"base"})


def test_metric_names_are_unique_across_files_and_cost_and_info_are_apart(pipeline_run):
    names = [set(_flat(_json(pipeline_run / path))) for path in (
        paths.EVAL_METRICS, paths.EVAL_BASE_METRICS, paths.EVAL_COST, paths.EVAL_BASE_COST)]
    assert sum(len(n) for n in names) == len(set.union(*names))
    for path, stage in ((paths.EVAL_COST, "evaluate"), (paths.EVAL_BASE_COST, "evaluate_base")):
        cost = _json(pipeline_run / path)[stage]
        assert cost["new_tokens_per_s"] > 0 and cost["batch_size"] == 8
        assert set(cost["seconds"]) == {"loss", "decision", "generation"}
    for path in (paths.EVAL_INFO, paths.EVAL_BASE_INFO):
        info = _json(pipeline_run / path)
        assert info["test"]["n"] == 5 and info["validation"]["n"] == 5
        assert info["rouge"]["tokenizer"] == "morpheme" and info["generation"]["max_new_tokens"] == 24
        assert info["decision"]["n"] + sum(info["decision"]["skipped"].values()) == 5


def test_deltas_are_fine_tuned_minus_base_with_an_interval_around_them(pipeline_run):
    tuned, base = _json(pipeline_run / paths.EVAL_METRICS), _json(pipeline_run / paths.EVAL_BASE_METRICS)
    deltas = tuned["vs_base"]["test"]
    assert set(deltas) == DELTA_KEYS
    for name, delta in deltas.items():
        assert delta["delta"] == pytest.approx(tuned["tuned"]["test"][name] - base["base"]["test"][name], abs=1e-9)
        assert delta["ci_low"] <= delta["delta"] <= delta["ci_high"]


def test_predictions_put_fine_tuned_and_base_answers_side_by_side(pipeline_run):
    records = read_jsonl(pipeline_run / paths.PREDICTIONS)
    base = {r["id"]: r for r in read_jsonl(pipeline_run / paths.BASE_PREDICTIONS)}
    test_rows = {r["id"]: r for r in _rows(pipeline_run, "test")}
    assert [r["id"] for r in records] == list(test_rows)
    for record in records:
        assert record["question"] == test_rows[record["id"]]["question"]
        assert record["reference"] == test_rows[record["id"]]["answer"]
        for field in ("answer", "rougeL", "answer_nll", "answer_tokens", "cut_off", "decision"):
            assert record[f"base_{field}"] == base[record["id"]][field]
        assert {"answer", "rouge1", "rouge2", "rougeL"} <= set(record)
    metrics = _json(pipeline_run / paths.EVAL_METRICS)["tuned"]["test"]
    assert metrics["rougeL"] == pytest.approx(sum(r["rougeL"] for r in records) / len(records))
    # The per-question answer losses add up to the test loss (a per-token mean).
    nll, tokens = sum(r["answer_nll"] for r in records), sum(r["answer_tokens"] for r in records)
    assert metrics["loss"] == pytest.approx(nll / tokens)
    assert metrics["cut_off"] == sum(r["cut_off"] for r in records) / len(records)


def test_plot_data_pairs_each_question_of_both_models(pipeline_run):
    records = {r["id"]: r for r in read_jsonl(pipeline_run / paths.PREDICTIONS)}
    decisions = _json(pipeline_run / paths.DECISION_PLOT)
    assert len(decisions) == sum(r["decision"] is not None for r in records.values())
    for row in decisions:
        record = records[row["id"]]
        assert (row["reference"], row["base"], row["fine_tuned"]) == (
            record["reference_decision"], record["base_decision"], record["decision"])
    assert _json(pipeline_run / paths.ROUGE_PLOT) == [
        {"id": r["id"], "base": r["base_rougeL"], "fine_tuned": r["rougeL"]} for r in records.values()]


def test_report_has_the_headline_table_and_the_questions_that_changed(pipeline_run):
    report = (pipeline_run / paths.REPORT).read_text(encoding="utf-8")
    metrics = _json(pipeline_run / paths.EVAL_METRICS)
    base = _json(pipeline_run / paths.EVAL_BASE_METRICS)["base"]
    loss_line = next(line for line in report.splitlines() if line.startswith("| answer loss (nats/token) |"))
    assert f"{base['test']['loss']:.4f}" in loss_line and f"{metrics['tuned']['test']['loss']:.4f}" in loss_line
    assert f"{metrics['vs_base']['test']['loss']['delta']:+.3f}".replace("-", "\u2212") in loss_line
    for section in ("Improved most", "Regressed most", "Decisions fixed", "Decisions broken"):
        assert f"### {section}" in report
    assert "**Base** (rows: reference" in report and "**Fine-tuned** (rows: reference" in report
    assert "Small test set" in report and "commit `" in report


def test_evaluate_without_its_inputs_says_what_to_run(workspace, capsys):
    from stages import evaluate

    with pytest.raises(SystemExit):
        evaluate.main()
    assert "run `dvc repro merge` first" in capsys.readouterr().err
