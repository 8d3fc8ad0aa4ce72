"""The yes/no/maybe decision: option log-likelihoods against a plain forward pass, the sum rule,
English and Korean options, skipped rows, accuracy and macro-F1 by hand, the params."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from stages import paths
from stages.decision import (check_same_chat, choose, decision_metrics, decision_summary, option_examples,
                             reference_label, skipped_counts)
from stages.errors import UserError
from stages.evaluation import evaluate_model, score_decisions
from stages.modeling import load_for_inference
from stages.outputs import jsonl_text, read_jsonl
from stages.params import parse_params
from stages.prompt import build_messages, render_prompt
from stages.records import clean_records

from tools.smoke import set_key
ROOT = Path(__file__).resolve().parents[1]
KOREAN = "위 초록의 결과에 근거하여 질문에 예, 아니요, 불확실 중 한 단어로만 답하세요."
ENGLISH_OPTIONS = {"yes": "yes", "no": "no", "maybe": "maybe"}
ENGLISH = "Answer the question with one word: {options}."


def make_params(**overrides):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in overrides.items():
        set_key(raw, key, value)
    return parse_params(raw)


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_for_inference(str(tiny_model), "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def rows(sample_records, tiny_tokenizer):
    """Four prepared-like rows: the training prompt rendered as prepare renders it."""
    system = make_params().prompt.system
    cleaned, _, _ = clean_records(sample_records[:4], min_chars=5)
    for row in cleaned:
        row["contexts"] = [c[:80] for c in row["contexts"][:2]]  # short: a fast CPU forward pass
        row["prompt"] = render_prompt(tiny_tokenizer, build_messages(system, row["question"], row["contexts"]))
    return cleaned


def plain_logprob(model, tokenizer, system, row, instruction, word, contexts=True) -> tuple[float, int]:
    """log P(reply = word) from one unbatched forward pass on the chat written out by hand
    (without the abstract when not `contexts`)."""
    asked = f"질문: {row['question']}\n\n초록:\n" + "\n\n".join(row["contexts"]) if contexts else row["question"]
    user = f"{asked}\n\n{instruction}"
    chat = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(f"{word}<|eot_id|>", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + reply_ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    # The logits at position t predict token t + 1.
    total = sum(logprobs[len(prompt_ids) - 1 + k, token].item() for k, token in enumerate(reply_ids))
    return total, len(reply_ids)


@pytest.mark.parametrize("language", ["korean", "english"])
def test_option_logprobs_equal_a_plain_forward_pass_and_the_sum_decides(model, tiny_tokenizer, rows, language):
    if language == "korean":
        params, instruction = make_params(), KOREAN
    else:
        params = make_params(**{"eval.decision_options": ENGLISH_OPTIONS, "eval.decision_instruction": ENGLISH})
        instruction = "Answer the question with one word: yes, no, maybe."
    options = params.eval.decision_options
    scored, option_tokens = score_decisions(model, tiny_tokenizer, rows, params.model_copy(
        update={"eval": params.eval.model_copy(update={"batch_size": 5})}))  # batches cut across questions
    disagreements = 0
    for row, result in zip(rows, scored):
        expected = {label: plain_logprob(model, tiny_tokenizer, params.prompt.system, row, instruction, word)
                    for label, word in options.items()}
        assert result["option_logprobs"] == pytest.approx({k: v[0] for k, v in expected.items()}, abs=1e-4)
        assert option_tokens == {label: count for label, (_, count) in expected.items()}
        by_sum = max(expected, key=lambda label: expected[label][0])
        by_mean = max(expected, key=lambda label: expected[label][0] / expected[label][1])
        assert result["decision"] == by_sum
        disagreements += by_sum != by_mean
    if language == "korean":
        # 예 is shorter than 아니요 and 불확실 in this tokenizer, so the two rules part ways here:
        # the test would fail if decisions were taken on the per-token mean.
        assert len(set(option_tokens.values())) > 1 and disagreements > 0


def test_without_contexts_the_decision_chat_holds_the_question_alone(model, tiny_tokenizer, rows):
    # data.include_contexts: false trains on the bare question; the decision must be asked the same way.
    params = make_params(**{"data.include_contexts": False})
    system = params.prompt.system
    bare = [{**row, "prompt": render_prompt(tiny_tokenizer, build_messages(system, row["question"], row["contexts"],
                                                                           False))} for row in rows]
    scored, _ = score_decisions(model, tiny_tokenizer, bare, params)
    for row, result in zip(bare, scored):
        expected = {label: plain_logprob(model, tiny_tokenizer, system, row, KOREAN, word, contexts=False)[0]
                    for label, word in params.eval.decision_options.items()}
        assert result["option_logprobs"] == pytest.approx(expected, abs=1e-4)


def test_the_sum_not_the_mean_decides():
    # "no" is one token at log-probability -1.0; "maybe" three tokens summing to -1.5 (mean -0.5).
    logprobs, tokens = {"yes": -4.0, "no": -1.0, "maybe": -1.5}, {"yes": 1, "no": 1, "maybe": 3}
    assert max(logprobs, key=lambda k: logprobs[k] / tokens[k]) == "maybe"  # what the mean would pick
    assert choose(logprobs) == "no"
    assert choose({"yes": -2.0, "no": -2.0, "maybe": -3.0}) == "yes"  # a tie goes to the first option


def test_rows_without_a_reference_decision_are_skipped_and_counted(model, tiny_tokenizer, rows):
    unlabelled = [dict(rows[0]), dict(rows[1]), rows[2]]
    del unlabelled[0]["final_decision"]
    unlabelled[1]["final_decision"] = "unclear"
    scored, _ = score_decisions(model, tiny_tokenizer, unlabelled, make_params())
    assert scored[0] is None and scored[1] is None and scored[2]["decision"] in ("yes", "no", "maybe")
    references = [row.get("final_decision") for row in unlabelled]
    assert skipped_counts(references, make_params().eval.decision_options) == {"missing": 1, "not_an_option": 1}


def test_evaluate_model_counts_skipped_rows_and_scores_the_rest(pipeline_run, tmp_path, monkeypatch):
    workspace = tmp_path / "ws"
    shutil.copytree(pipeline_run, workspace, symlinks=True)
    monkeypatch.chdir(workspace)
    test_rows = read_jsonl(paths.split_file("test"))
    del test_rows[0]["final_decision"]
    paths.split_file("test").write_text(jsonl_text(test_rows), encoding="utf-8")
    params = parse_params(yaml.safe_load((workspace / "params.yaml").read_text(encoding="utf-8")))
    from stages.modeling import load_tokenizer

    result = evaluate_model(load_for_inference(str(paths.MERGED_DIR), "merged"),
                            load_tokenizer(str(paths.MERGED_DIR)), params)
    assert result.info["decision"]["skipped"] == {"missing": 1, "not_an_option": 0}
    assert result.info["decision"]["n"] == len(test_rows) - 1
    first = result.predictions[0]
    assert first["reference_decision"] is None and first["decision"] is None and first["option_logprobs"] is None
    scored = [p for p in result.predictions[1:]]
    assert all(p["decision"] == choose(p["option_logprobs"]) for p in scored)
    correct = sum(p["decision"] == p["reference_decision"] for p in scored)
    assert result.quality["test"]["accuracy"] == pytest.approx(correct / len(scored))
    assert sum(result.info["decision"]["reference_counts"].values()) == len(scored)


def test_accuracy_macro_f1_and_confusion_by_hand():
    pairs = [("yes", "yes"), ("yes", "no"), ("no", "no"), ("maybe", "yes"), ("no", "no")]
    metrics = decision_metrics(pairs, ["yes", "no", "maybe"])
    # F1 = 2 hits / (references + decisions). yes: 2 * 1 / (2 + 2) = 0.5; no: 2 * 2 / (2 + 3) = 0.8;
    # maybe: 0 hits, F1 = 0.
    assert metrics["accuracy"] == 3 / 5
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert metrics["confusion"] == {"yes": {"yes": 1, "no": 1, "maybe": 0}, "no": {"yes": 0, "no": 2, "maybe": 0},
                                    "maybe": {"yes": 1, "no": 0, "maybe": 0}}
    assert metrics["reference_counts"] == {"yes": 2, "no": 2, "maybe": 1}
    assert metrics["decision_counts"] == {"yes": 2, "no": 3, "maybe": 0}
    # A class neither in the references nor among the decisions does not count as an F1 of 0.
    assert decision_metrics([("yes", "yes"), ("no", "yes")], ["yes", "no", "maybe"])["macro_f1"] == pytest.approx(
        (2 / 3 + 0.0) / 2)


def test_decision_summary_scores_the_decided_rows_and_counts_the_skipped():
    # Options yes / no only: a "maybe" reference is not an option, so the row is not scored (decision None).
    options = {"yes": "예", "no": "아니요"}
    assert [reference_label({"final_decision": label}, options) for label in ("no", "maybe", None)] == ["no", None, None]
    assert reference_label({}, options) is None
    predictions = [{"reference_decision": ref, "decision": dec}
                   for ref, dec in [("yes", "yes"), ("no", "yes"), ("no", "no"), (None, None), ("maybe", None)]]
    quality, info = decision_summary(predictions, options)
    # F1 yes = 2 * 1 / (1 reference + 2 decisions) = 2/3; no = 2 * 1 / (2 + 1) = 2/3
    assert quality == {"accuracy": pytest.approx(2 / 3), "macro_f1": pytest.approx(2 / 3)}
    assert info == {"n": 3, "options": options, "skipped": {"missing": 1, "not_an_option": 1},
                    "reference_counts": {"yes": 1, "no": 2}, "decision_counts": {"yes": 2, "no": 1},
                    "confusion": {"yes": {"yes": 1, "no": 0}, "no": {"yes": 1, "no": 1}}}
    assert decision_summary(predictions[3:], options) == (
        {}, {"n": 0, "options": options, "skipped": {"missing": 1, "not_an_option": 1}})
    with pytest.raises(ValueError, match="^no \\(reference, decision\\) pairs to score$"):
        decision_metrics([], list(options))


def test_each_option_is_scored_as_the_whole_reply_to_one_decision_chat(tiny_tokenizer):
    row = {"id": "q7", "question": "운동은 혈압을 낮추는가?", "contexts": ["운동군의 혈압이 낮았다."]}
    examples = option_examples(tiny_tokenizer, row, "시스템", True, "{options} 중 하나로 답하세요.",
                               {"yes": "예", "no": "아니요", "maybe": "불확실"})
    prompts, replies = [], []
    for example in examples:
        n_prompt = example["labels"].count(-100)
        assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]  # the reply alone is scored
        prompts.append(tiny_tokenizer.decode(example["input_ids"][:n_prompt]))
        replies.append(tiny_tokenizer.decode(example["input_ids"][n_prompt:]))
    assert replies == ["예<|eot_id|>", "아니요<|eot_id|>", "불확실<|eot_id|>"]  # in option order, end of turn included
    assert prompts[0] == prompts[1] == prompts[2]
    assert prompts[0].endswith("질문: 운동은 혈압을 낮추는가?\n\n초록:\n운동군의 혈압이 낮았다.\n\n예, 아니요, 불확실 중 하나로 "
                               "답하세요.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "시스템" in prompts[0]


def test_a_prepared_prompt_must_be_the_chat_rendered_now(tiny_tokenizer):
    row = {"id": "q7", "question": "운동은 혈압을 낮추는가?", "contexts": ["운동군의 혈압이 낮았다."]}
    row["prompt"] = render_prompt(tiny_tokenizer, build_messages("시스템", row["question"], row["contexts"], True))
    check_same_chat(tiny_tokenizer, row, "시스템", True)
    for system, include_contexts in (("다른 시스템", True), ("시스템", False)):
        with pytest.raises(UserError) as error:
            check_same_chat(tiny_tokenizer, row, system, include_contexts)
        assert str(error.value) == (
            "question q7: the training chat rendered now differs from data/prepared's (another prompt.system, "
            "data.include_contexts or chat template); run `dvc repro` so prepare renders the chats again")


def test_shipped_options_are_korean_and_yaml_booleans_are_read_as_words():
    assert make_params().eval.decision_options == {"yes": "예", "no": "아니요", "maybe": "불확실"}
    # Unquoted in YAML 1.1, `yes: yes` loads as {True: True}: taken as the words the user wrote.
    raw_english = yaml.safe_load("{yes: yes, no: no, maybe: maybe}")
    assert True in raw_english
    params = make_params(**{"eval.decision_options": raw_english, "eval.decision_instruction": ENGLISH})
    assert params.eval.decision_options == ENGLISH_OPTIONS


@pytest.mark.parametrize("key, value, expected", [
    ("eval.decision_options", {"yes": "예"}, "at least two labels"),
    ("eval.decision_options", {"yes": "예", "no": "예"}, "share one option word"),
    ("eval.decision_options", {"yes": "예", "no": " "}, "must not be empty"),
    ("eval.decision_instruction", "한 단어로 답하세요.", "must contain {options}"),
    ("eval.decision_instruction", "{options} 중 {n}개", "must contain {options}"),
    ("eval.bootstrap_samples", 10, "eval.bootstrap_samples = 10"),
])
def test_bad_decision_params_name_the_key(key, value, expected):
    with pytest.raises(UserError) as error:
        make_params(**{key: value})
    assert key in str(error.value) and expected in str(error.value)


def test_a_stale_prepared_prompt_is_refused(model, tiny_tokenizer, rows):
    changed = make_params(**{"prompt.system": "다른 시스템 프롬프트"})
    with pytest.raises(UserError, match="run `dvc repro`"):
        score_decisions(model, tiny_tokenizer, rows, changed)


def test_predictions_hold_both_models_decisions_and_option_logprobs(pipeline_run):
    records = read_jsonl(pipeline_run / paths.PREDICTIONS)
    base = {r["id"]: r for r in read_jsonl(pipeline_run / paths.BASE_PREDICTIONS)}
    test_rows = {r["id"]: r for r in read_jsonl(pipeline_run / paths.split_file("test"))}
    options = json.loads((pipeline_run / paths.EVAL_INFO).read_text(encoding="utf-8"))["decision"]["options"]
    for record in records:
        assert record["reference_decision"] == test_rows[record["id"]]["final_decision"]
        assert record["base_decision"] == base[record["id"]]["decision"]
        assert record["base_option_logprobs"] == base[record["id"]]["option_logprobs"]
        for prefix in ("", "base_"):
            assert set(record[f"{prefix}option_logprobs"]) == set(options)
            assert record[f"{prefix}decision"] == choose(record[f"{prefix}option_logprobs"])
    # The base and the fine-tuned model are different models: their log-likelihoods differ.
    assert any(r["option_logprobs"] != r["base_option_logprobs"] for r in records)
