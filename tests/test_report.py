"""The review report: which questions come first, how changes and verdicts read, run identity."""

import math
import subprocess

import pytest
import yaml

from stages.report import (changed_params, most_changed, option_probability, read_yaml12, report, run_identity,
                           side_by_side)

LOGPROBS_RIGHT = {"yes": -0.1, "no": -3.0, "maybe": -4.0}  # "yes" takes most of the options' probability
LOGPROBS_WRONG = {"yes": -3.0, "no": -0.1, "maybe": -4.0}


def record(qid, rouge, base_rouge, decision="yes", base_decision="yes", reference="yes",
           logprobs=LOGPROBS_RIGHT, base_logprobs=LOGPROBS_RIGHT):
    return {
        "id": qid, "question": f"question {qid}?", "reference": f"reference {qid}",
        "answer": f"fine-tuned answer {qid}", "base_answer": f"base answer {qid}",
        "rougeL": rouge, "base_rougeL": base_rouge, "reference_decision": reference,
        "decision": decision, "base_decision": base_decision, "cut_off": False, "base_cut_off": qid == "q1",
        "option_logprobs": logprobs, "base_option_logprobs": base_logprobs,
    }


# ROUGE-L changes: q1 +0.5, q2 +0.1, q3 -0.3, q4 -0.05, q5 0.
RECORDS = [record("q2", 0.3, 0.2), record("q4", 0.45, 0.5), record("q1", 0.6, 0.1), record("q5", 0.4, 0.4),
           record("q3", 0.1, 0.4)]


def test_improved_and_regressed_most_come_largest_change_first():
    changed = most_changed(RECORDS, 5)
    assert [r["id"] for r in changed["improved"]] == ["q1", "q2"]
    assert [r["id"] for r in changed["regressed"]] == ["q3", "q4"]
    assert [r["id"] for r in most_changed(RECORDS, 1)["regressed"]] == ["q3"]


def test_decision_flips_are_ordered_by_the_change_in_the_reference_options_probability():
    small_gain = {"yes": -1.0, "no": -0.9, "maybe": -4.0}  # right, but barely
    flips = [
        record("fixed-small", 0.2, 0.2, "yes", "no", logprobs=small_gain, base_logprobs=LOGPROBS_WRONG),
        record("fixed-large", 0.2, 0.2, "yes", "no", logprobs=LOGPROBS_RIGHT, base_logprobs=LOGPROBS_WRONG),
        record("broken-small", 0.2, 0.2, "no", "yes", logprobs=LOGPROBS_WRONG, base_logprobs=small_gain),
        record("broken-large", 0.2, 0.2, "no", "yes", logprobs=LOGPROBS_WRONG, base_logprobs=LOGPROBS_RIGHT),
        record("both-wrong", 0.2, 0.2, "no", "no", logprobs=LOGPROBS_WRONG, base_logprobs=LOGPROBS_WRONG),
        record("undecided", 0.2, 0.2, None, None, reference=None, logprobs=None, base_logprobs=None),
    ]
    changed = most_changed(flips, 5)
    assert [r["id"] for r in changed["fixed"]] == ["fixed-large", "fixed-small"]
    assert [r["id"] for r in changed["broken"]] == ["broken-large", "broken-small"]


def test_option_probability_is_a_softmax_over_the_options():
    assert option_probability({"yes": math.log(0.2), "no": math.log(0.6)}, "no") == pytest.approx(0.75)
    assert option_probability(None, "yes") is None


QUALITY = {
    "test": {"accuracy": 0.5, "macro_f1": 0.4, "rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.25, "loss": 1.2,
             "perplexity": 3.32, "cut_off": 0.1},
    "validation": {"loss": 1.3, "perplexity": 3.67},
}
DELTAS = {
    "accuracy": {"delta": 0.02, "ci_low": -0.04, "ci_high": 0.08},
    "rougeL": {"delta": 0.021, "ci_low": -0.004, "ci_high": 0.046},
    "rouge1": {"delta": 0.05, "ci_low": 0.01, "ci_high": 0.09},
    "rouge2": {"delta": -0.03, "ci_low": -0.05, "ci_high": -0.01},
    "loss": {"delta": -0.3, "ci_low": -0.4, "ci_high": -0.2},
}
IDENTITY = {"commit": "abc1234", "experiment": "noble-yaks", "code_changed": False,
            "changed": [("lora.r", 16, 8)], "model": "m-4bit", "base": "m-16bit"}


def info(n):
    return {"test": {"n": n}, "validation": {"n": n},
            "decision": {"n": n, "options": {"yes": "예", "no": "아니요", "maybe": "불확실"},
                         "skipped": {"missing": 2, "not_an_option": 0},
                         "confusion": {"yes": {"yes": 3, "no": 1, "maybe": 0}, "no": {"yes": 0, "no": 0, "maybe": 0},
                                       "maybe": {"yes": 0, "no": 0, "maybe": 1}}},
            "generation": {"max_new_tokens": 256, "cut_off": 1}, "rouge": {"tokenizer": "morpheme"}}


def render(n=50, n_examples=2):
    return report(QUALITY, QUALITY, DELTAS, RECORDS, info(n), IDENTITY, n_examples, 1000)


def _row(text, label):
    return next(line for line in text.splitlines() if line.startswith(f"| {label} |"))


def test_changes_read_with_their_interval_and_a_verdict_in_the_better_direction():
    text = render()
    assert "| +0.021 [\u22120.004, +0.046] | no clear change |" in _row(text, "ROUGE-L F1")
    assert _row(text, "ROUGE-1 F1").endswith("| +0.050 [+0.010, +0.090] | **better** |")
    assert _row(text, "ROUGE-2 F1").endswith("| **worse** |")
    # Lower is better for the loss: an interval below 0 is an improvement.
    assert _row(text, "answer loss (nats/token)").startswith("| answer loss (nats/token) | lower | 1.2000 | 1.2000 |")
    assert _row(text, "answer loss (nats/token)").endswith("| \u22120.300 [\u22120.400, \u22120.200] | **better** |")
    assert _row(text, "decision accuracy").startswith("| decision accuracy | higher |")


def test_report_names_the_run_and_warns_about_a_small_test_set():
    text = render(n=50)
    assert "experiment `noble-yaks` on commit `abc1234`" in text
    assert "`lora.r` 16 \u2192 8" in text and "fine-tuned `m-4bit`" in text and "base `m-16bit`" in text
    assert "With 50 questions one question moves accuracy by 2.0 points" in text
    assert "Small test set" not in render(n=500)
    assert "skipped: 2 missing final_decision" in text
    assert "base 1 of 50, fine-tuned 1 of 50" in text  # answers cut at max_new_tokens


def test_report_lists_the_most_improved_and_regressed_questions_in_order():
    text = render(n_examples=2)
    improved = text.split("\n### Improved most")[1].split("\n### ")[0]
    regressed = text.split("\n### Regressed most")[1].split("\n### ")[0]
    assert improved.index("q1:") < improved.index("q2:") and "q3:" not in improved
    assert regressed.index("q3:") < regressed.index("q4:") and "q1:" not in regressed
    assert "| base | yes (0.93) | base answer q3 | 0.400 |" in regressed
    assert "| fine-tuned | yes (0.93) | fine-tuned answer q3 | 0.100 (\u22120.300) |" in regressed
    assert "| reference | yes | reference q3 | |" in regressed
    assert "### Questions that changed" not in render(n_examples=0)


def test_confusion_matrices_of_both_models():
    text = render()
    fine_tuned = text.split("**Fine-tuned**")[1]
    assert "| yes | **3** | 1 | 0 | 4 |" in fine_tuned
    base = text.split("**Base**")[1].split("**Fine-tuned**")[0]
    assert "| yes | **5** | 0 | 0 | 5 |" in base  # recomputed from the records: all base decisions are yes


def test_side_by_side_refuses_other_questions():
    with pytest.raises(ValueError):
        side_by_side([{"id": "1"}], [{"id": "2"}])
    merged = side_by_side([{"id": "1", "answer": "a"}], [{"id": "1", "answer": "b", "decision": "no"}])
    assert merged == [{"id": "1", "answer": "a", **{f"base_{k}": None for k in (
        "rouge1", "rouge2", "rougeL", "cut_off", "answer_nll", "answer_tokens", "option_logprobs")},
        "base_answer": "b", "base_decision": "no"}]


def test_changed_params_and_the_run_identity_from_git(tmp_path, monkeypatch):
    assert changed_params({"lora": {"r": 8, "alpha": 16}, "seed": 1}, {"lora": {"r": 16, "alpha": 16}, "seed": 1}) \
        == [("lora.r", 16, 8)]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    params = {"model": {"name": "m", "base_16bit": "b"}, "lora": {"r": 16}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert run_identity()["commit"] is None and run_identity()["changed"] is None
    for command in (["init", "-q"], ["add", "params.yaml"],
                    ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params"]):
        subprocess.run(["git", *command], check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    params["lora"]["r"] = 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    identity = run_identity()
    assert identity["commit"] == head[:7] and identity["changed"] == [("lora.r", 16, 8)]
    assert (identity["model"], identity["base"], identity["experiment"]) == ("m", "b", None)
    monkeypatch.setenv("DVC_EXP_NAME", "noble-yaks")
    assert run_identity()["experiment"] == "noble-yaks"


def test_params_are_compared_as_dvc_reads_them_so_its_unquoted_yes_stays_a_word():
    quoted = "eval:\n  decision_options: {'yes': 예, 'no': 아니요}\n  do_sample: false\n"
    rewritten_by_dvc = "eval:\n  decision_options:\n    yes: 예\n    no: 아니요\n  do_sample: false\n"
    assert read_yaml12(rewritten_by_dvc) == read_yaml12(quoted) == {
        "eval": {"decision_options": {"yes": "예", "no": "아니요"}, "do_sample": False}}
    assert changed_params(read_yaml12(rewritten_by_dvc), read_yaml12(quoted)) == []
    assert True in yaml.safe_load(rewritten_by_dvc)["eval"]["decision_options"]  # what YAML 1.1 would see


def test_a_dataset_without_decision_labels_gets_a_report_without_decisions():
    records = [dict(r, decision=None, base_decision=None, reference_decision=None, option_logprobs=None,
                    base_option_logprobs=None) for r in RECORDS]
    quality = {"test": {k: v for k, v in QUALITY["test"].items() if k not in ("accuracy", "macro_f1")},
               "validation": QUALITY["validation"]}
    no_labels = info(5)
    no_labels["decision"] = {"n": 0, "options": no_labels["decision"]["options"],
                             "skipped": {"missing": 5, "not_an_option": 0}}
    deltas = {k: v for k, v in DELTAS.items() if k != "accuracy"}
    text = report(quality, quality, deltas, records, no_labels, IDENTITY, 2, 1000)
    assert "decision accuracy" not in text and "\n## Decisions\n" not in text
    assert "0 questions scored, skipped: 5 missing final_decision" in text
    assert "(0)\n\nNone." in text.split("### Decisions fixed")[1]
