"""Evaluation: answer-token loss, batched generation, the metrics files and the report."""

import json
import math
import re
import shutil

import pytest
import torch

from conftest import write_params
from stages import paths
from stages.errors import UserError
from stages.evaluation import _batches, answer_loss, generate_answers, loss_summary, read_split, stop_token_ids
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
    directory = str(pipeline_run / "tiny-base")
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


def test_the_validation_loss_is_the_loss_on_the_validation_rows(pipeline_run, base):
    # Two measurements of the fine-tuned model on the validation rows, made apart: the Trainer's last
    # one (of the final model; its 5 rows fit one eval batch, whose mean is over answer tokens) and
    # evaluate's on the merged model. The test rows' loss is another number, so a validation loss
    # taken on the test split fails here.
    trained = _json(pipeline_run / paths.TRAIN_METRICS)["train"]["eval_loss_last"]
    tuned = _json(pipeline_run / paths.EVAL_METRICS)["tuned"]
    assert tuned["validation"]["loss"] == pytest.approx(trained, rel=1e-5)
    assert tuned["validation"]["loss"] != pytest.approx(tuned["test"]["loss"], rel=1e-5)
    model, tokenizer = base  # and the base model's, on the same rows
    expected = answer_loss(model, tokenizer, _rows(pipeline_run, "validation"), batch_size=8)["loss"]
    measured = _json(pipeline_run / paths.EVAL_BASE_METRICS)["base"]["validation"]["loss"]
    assert measured == pytest.approx(expected, rel=1e-6)


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


def test_stop_tokens_are_the_templates_end_of_turn_where_nothing_else_names_one(tiny_tokenizer):
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GenerationConfig

    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=None))
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.eos_token = None
    assert stop_token_ids(model, tokenizer) == [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    # A template that closes a turn with another token: that one, read from the template, not a name.
    tokenizer.chat_template = tokenizer.chat_template.replace("<|eot_id|>", "<|end_of_text|>")
    assert stop_token_ids(model, tokenizer) == [tokenizer.convert_tokens_to_ids("<|end_of_text|>")]


def test_a_missing_split_says_to_run_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^data/prepared/test.jsonl is missing; run `dvc repro prepare` first$"):
        read_split("test")
    paths.split_file("test").parent.mkdir(parents=True)
    paths.split_file("test").write_text('{"id": "a"}\n{"id": "b"}\n', encoding="utf-8")
    assert read_split("test") == [{"id": "a"}, {"id": "b"}]


def test_loss_is_the_mean_over_answer_tokens_not_over_rows():
    # rows of (sum of log-probabilities, answer tokens): 3 nats over 4 tokens, not (1 + 0.5) / 2 rows
    summary = loss_summary([(-2.0, 1), (-1.0, 3)])
    assert summary == {"loss": 0.75, "perplexity": pytest.approx(math.exp(0.75)), "n": 2, "answer_tokens": 4}
    assert loss_summary([(-200.0, 2)])["perplexity"] == pytest.approx(math.exp(50.0))  # capped: no overflow
    with pytest.raises(UserError) as error:
        loss_summary([(0.0, 0), (0.0, 0)])
    assert str(error.value) == ("no answer token to score in 2 prepared rows (an empty split, or every answer cut off); "
                                "rerun `dvc repro prepare`")


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
    """The reference: transformers' generate on this one prompt (no padding, nothing to reorder)."""
    one = eval_params.model_copy(update={"batch_size": 1, "decoder": "generate"})
    [answer], _ = generate_answers(model, tokenizer, [prompt], one, seed)
    return answer


@pytest.mark.parametrize("decoder", ["fast", "generate"])
def test_batched_and_one_at_a_time_greedy_answers_are_the_same(pipeline_run, base, decoder):
    model, tokenizer = base
    eval_params = load_params(pipeline_run / "params.yaml").eval
    prompts = [row["prompt"] for row in _rows(pipeline_run, "test")]
    # 4 at once for 5 questions: generate pads a batch of 4; the fast loop refills a slot mid-run
    batched, stats = generate_answers(model, tokenizer, prompts,
                                      eval_params.model_copy(update={"batch_size": 4, "decoder": decoder}), 0)
    assert stats["decoder"] == decoder and stats["batch_size"] == 4
    # Each prompt in a call of its own: nothing to reorder, so a batched list in any other order differs.
    single = [_alone(model, tokenizer, prompt, eval_params, 0) for prompt in prompts]
    assert batched == single
    assert len(set(single)) == len(single), "distinct answers, or a reordering could not show"
    assert 0 < stats["mean_new_tokens"] <= eval_params.max_new_tokens


@pytest.mark.parametrize("decoder", ["fast", "generate"])
def test_scoring_and_generation_show_a_progress_bar_on_a_terminal_only(pipeline_run, base, decoder, monkeypatch,
                                                                        capsys):
    from stages import evaluation

    model, tokenizer = base
    eval_params = load_params(pipeline_run / "params.yaml").eval.model_copy(update={"batch_size": 2,
                                                                                    "decoder": decoder})
    rows = _rows(pipeline_run, "test")
    for terminal in (True, False):
        monkeypatch.setattr(evaluation, "progress_bars", lambda: terminal)
        capsys.readouterr()
        answer_loss(model, tokenizer, rows, 2, "test loss")
        generate_answers(model, tokenizer, [row["prompt"] for row in rows], eval_params, 0)
        err = capsys.readouterr().err
        if terminal:  # each bar counts to the last row and answer (5 test questions, 2 at a time)
            assert re.search(rf"test loss: 100%\S* {len(rows)}/{len(rows)}", err), err
            assert re.search(rf"generating: 100%\S* {len(rows)}/{len(rows)}", err), err
        else:  # a log file: no bar at all
            assert "test loss" not in err and "generating" not in err, err


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
    metrics = json.loads(paths.EVAL_BASE_METRICS.read_text(encoding="utf-8"))["base"]
    info = json.loads(paths.EVAL_BASE_INFO.read_text(encoding="utf-8"))
    records = read_jsonl(paths.BASE_PREDICTIONS)
    by_morpheme = read_jsonl(pipeline_run / paths.BASE_PREDICTIONS)
    assert [r["answer"] for r in records] == [r["answer"] for r in by_morpheme]  # the same answers, rescored
    assert info["rouge"]["tokenizer"] == "char"
    char, words = RougeScorer("char"), RougeScorer("whitespace")
    for record in records:
        assert {name: record[name] for name in ROUGE_TYPES} == char.score(record["reference"], record["answer"])
    # Answers the tokenizers disagree on: neither the default nor words give these numbers.
    assert any(r["rouge1"] != m["rouge1"] for r, m in zip(records, by_morpheme))
    assert any(r["rouge1"] != words.score(r["reference"], r["answer"])["rouge1"] for r in records)
    assert metrics["test"]["rouge1"] == pytest.approx(sum(r["rouge1"] for r in records) / len(records))


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
        # eval.batch_size 8 (tools/smoke.py) for 5 test questions: 5 written at once, no empty slot
        assert cost["new_tokens_per_s"] > 0 and cost["batch_size"] == 5 and cost["warmup_s"] >= 0
        assert set(cost["seconds"]) == {"loss", "decision", "generation"}
    for path in (paths.EVAL_INFO, paths.EVAL_BASE_INFO):
        info = _json(pipeline_run / path)
        assert info["test"]["n"] == 5 and info["validation"]["n"] == 5
        assert info["rouge"]["tokenizer"] == "morpheme" and info["generation"]["max_new_tokens"] == 24
        assert info["generation"]["decoder"] == "fast"  # the tiny Llama takes the fast loop on the CPU too
        assert info["decision"]["n"] + sum(info["decision"]["skipped"].values()) == 5
        assert info["device"] == "cpu"  # what the cost beside it was measured on


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
