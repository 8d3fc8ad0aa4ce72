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


EVAL_KEYS = {
    "validation": {"loss", "perplexity", "n"},
    "test": {"loss", "perplexity", "n", "rouge1", "rouge2", "rougeL"},
    "generation": {"new_tokens_per_s", "mean_new_tokens"},
}


@pytest.mark.parametrize("name", ["eval.json", "eval_base.json"])
def test_metrics_files_have_the_stable_schema(pipeline_run, name):
    metrics = json.loads((pipeline_run / "metrics" / name).read_text(encoding="utf-8"))
    for section, keys in EVAL_KEYS.items():
        assert keys <= set(metrics[section]), section
        assert all(isinstance(metrics[section][k], (int, float)) for k in keys)
    assert metrics["test"]["n"] == 5 and metrics["validation"]["n"] == 5
    assert all(0.0 <= metrics["test"][k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert metrics["rouge_tokenizer"]["tokenizer"] == "morpheme"


def test_predictions_put_fine_tuned_and_base_answers_side_by_side(pipeline_run):
    records = read_jsonl(pipeline_run / paths.PREDICTIONS)
    base = {r["id"]: r for r in read_jsonl(pipeline_run / paths.BASE_PREDICTIONS)}
    test_rows = {r["id"]: r for r in _rows(pipeline_run, "test")}
    assert [r["id"] for r in records] == list(test_rows)
    for record in records:
        assert record["question"] == test_rows[record["id"]]["question"]
        assert record["reference"] == test_rows[record["id"]]["answer"]
        assert record["base_answer"] == base[record["id"]]["answer"]
        assert record["base_rougeL"] == base[record["id"]]["rougeL"]
        assert {"answer", "rouge1", "rouge2", "rougeL"} <= set(record)
    metrics = json.loads((pipeline_run / paths.EVAL_METRICS).read_text(encoding="utf-8"))
    assert metrics["test"]["rougeL"] == pytest.approx(sum(r["rougeL"] for r in records) / len(records))


def test_report_has_the_headline_table_and_examples(pipeline_run):
    report = (pipeline_run / paths.REPORT).read_text(encoding="utf-8")
    metrics = json.loads((pipeline_run / paths.EVAL_METRICS).read_text(encoding="utf-8"))
    base = json.loads((pipeline_run / paths.EVAL_BASE_METRICS).read_text(encoding="utf-8"))
    loss_line = next(line for line in report.splitlines() if line.startswith("| test loss |"))
    assert f"{base['test']['loss']:.4f}" in loss_line and f"{metrics['test']['loss']:.4f}" in loss_line
    assert "## Best 2 by fine-tuned ROUGE-L" in report and "## Worst 2 by fine-tuned ROUGE-L" in report
    worst = min(read_jsonl(pipeline_run / paths.PREDICTIONS), key=lambda r: (r["rougeL"], r["id"]))
    assert worst["question"] in report.split("## Worst")[1]


def test_evaluate_without_its_inputs_says_what_to_run(workspace, capsys):
    from stages import evaluate

    with pytest.raises(SystemExit):
        evaluate.main()
    assert "run `dvc repro merge` first" in capsys.readouterr().err
