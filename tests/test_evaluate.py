"""Evaluation: answer-token loss, batched generation, the metrics files and the report."""

import json
import math
import shutil

import pytest
import torch

from conftest import write_params
from stages import paths
from stages.errors import UserError
from stages.evaluation import _batches, answer_loss, generate_answers, read_split, stop_token_ids
from stages.modeling import load_for_inference, load_tokenizer
from stages.outputs import read_jsonl
from stages.params import load_params
from stages.prompt import IGNORE_INDEX, tokenize_example
from stages.rouge import ROUGE_TYPES, RougeScorer


@pytest.fixture(scope="module")
def merged(pipeline_run):
    directory = str(pipeline_run / paths.MERGED_DIR)
    return load_for_inference(directory, "models/merged"), load_tokenizer(directory)


@pytest.fixture(scope="module")
def base(pipeline_run):
    # The untrained tiny model: its greedy answers differ from question to question, where the
    # smoke run's fine-tuned one answers "." to all, so only these show answers attached to the
    # wrong question.
    directory = str(pipeline_run / "models/tiny-base")
    return load_for_inference(directory, "model.base_16bit"), load_tokenizer(directory)


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


def test_batches_cover_every_item_once_in_order():
    assert list(_batches(list("abcde"), 2)) == [["a", "b"], ["c", "d"], ["e"]]
    assert list(_batches(list("abcd"), 4)) == [["a", "b", "c", "d"]]
    assert list(_batches([], 3)) == []


@pytest.mark.parametrize("configured", [None, 5, [5, 7]])
def test_generation_stops_at_end_of_turn_end_of_text_and_the_models_own_eos(tiny_tokenizer, configured):
    from types import SimpleNamespace

    from transformers import GenerationConfig

    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=configured))
    eot, end = tiny_tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert tiny_tokenizer.eos_token == "<|eot_id|>"
    own = [] if configured is None else [configured] if isinstance(configured, int) else configured
    assert stop_token_ids(model, tiny_tokenizer) == sorted({eot, *own})
    assert end not in stop_token_ids(model, tiny_tokenizer)  # only when the model's config names it


def test_stop_tokens_skip_what_the_tokenizer_does_not_know(tiny_tokenizer):
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GenerationConfig

    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=None))
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.unk_token = "<|end_of_text|>"  # a vocabulary without <|eot_id|> maps it to unk
    tokenizer.eos_token = None
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert stop_token_ids(model, tokenizer) == [eot]
    tokenizer.unk_token = "<|eot_id|>"
    assert stop_token_ids(model, tokenizer) == []


def test_a_missing_split_says_to_run_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^data/prepared/test.jsonl is missing; run `dvc repro prepare` first$"):
        read_split("test")
    paths.split_file("test").parent.mkdir(parents=True)
    paths.split_file("test").write_text('{"id": "a"}\n{"id": "b"}\n', encoding="utf-8")
    assert read_split("test") == [{"id": "a"}, {"id": "b"}]


def test_no_answer_token_is_an_error_not_a_perfect_score(tiny_model, tiny_tokenizer):
    model, tokenizer = load_for_inference(str(tiny_model), "model.name"), tiny_tokenizer
    with pytest.raises(UserError, match=r"no answer token to score in 0 prepared rows") as error:
        answer_loss(model, tokenizer, [], batch_size=4)
    assert "\n" not in str(error.value)


def test_an_empty_split_stops_evaluation_in_one_line(workspace, capsys):
    from stages import evaluate_base, prepare

    prepare.main()
    paths.split_file("validation").write_text("", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_base.main()
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: no answer token to score in 0 prepared rows (an empty split, or every answer cut off); "
                      "rerun `dvc repro prepare`"]
    assert not paths.EVAL_BASE_METRICS.exists()


def _alone(model, tokenizer, prompt, eval_params, seed):
    [answer], _ = generate_answers(model, tokenizer, [prompt], eval_params, seed)
    return answer


def test_batched_and_one_at_a_time_greedy_answers_are_the_same(pipeline_run, base):
    model, tokenizer = base
    eval_params = load_params(pipeline_run / "params.yaml").eval
    prompts = [row["prompt"] for row in _rows(pipeline_run, "test")]
    batched, stats = generate_answers(model, tokenizer, prompts, eval_params.model_copy(update={"batch_size": 4}), 0)
    # Each prompt in a call of its own: nothing to reorder, so a batched list in any other order differs.
    single = [_alone(model, tokenizer, prompt, eval_params, 0) for prompt in prompts]
    assert batched == single
    assert len(set(single)) == len(single), "distinct answers, or a reordering could not show"
    assert 0 < stats["mean_new_tokens"] <= eval_params.max_new_tokens


def test_each_recorded_answer_is_the_answer_to_its_own_question(pipeline_run, base):
    # generate_answers batches the longest prompts first; the answers must come back in input order.
    model, tokenizer = base
    params = load_params(pipeline_run / "params.yaml")
    rows = _rows(pipeline_run, "test")
    records = read_jsonl(pipeline_run / paths.PREDICTIONS)
    longest_first = sorted(range(len(rows)), key=lambda i: -len(rows[i]["prompt"]))
    moved = [i for i, j in enumerate(longest_first) if i != j]  # rows whose answer sorting would misplace
    assert moved and any(records[i]["base_answer"] != records[longest_first[i]]["base_answer"] for i in moved)
    for i in moved:  # never the longest prompt, which sorting leaves first
        assert records[i]["id"] == rows[i]["id"]
        assert records[i]["base_answer"] == _alone(model, tokenizer, rows[i]["prompt"], params.eval, params.seed), i


def test_the_rouge_tokenizer_param_reaches_the_scores(pipeline_run, tmp_path, monkeypatch):
    from stages import evaluate_base

    workspace = tmp_path / "ws"
    shutil.copytree(pipeline_run, workspace, symlinks=True)
    monkeypatch.chdir(workspace)
    write_params(workspace, {"eval.rouge_tokenizer": "char"})
    evaluate_base.main()  # through evaluate_model, as the evaluate stage
    metrics = json.loads(paths.EVAL_BASE_METRICS.read_text(encoding="utf-8"))
    records = read_jsonl(paths.BASE_PREDICTIONS)
    by_morpheme = read_jsonl(pipeline_run / paths.BASE_PREDICTIONS)
    assert [r["answer"] for r in records] == [r["answer"] for r in by_morpheme]  # the same answers, rescored
    assert metrics["rouge_tokenizer"]["tokenizer"] == "char"
    char, words = RougeScorer("char"), RougeScorer("whitespace")
    for record in records:
        assert {name: record[name] for name in ROUGE_TYPES} == char.score(record["reference"], record["answer"])
    # Answers the tokenizers disagree on: neither the default nor words give these numbers.
    assert any(r["rouge1"] != m["rouge1"] for r, m in zip(records, by_morpheme))
    assert any(r["rouge1"] != words.score(r["reference"], r["answer"])["rouge1"] for r in records)
    assert metrics["test"]["rouge1"] == pytest.approx(sum(r["rouge1"] for r in records) / len(records))


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
