"""The review report: which questions come first, how changes and verdicts read, run identity."""

import math
import subprocess
import unicodedata

import pytest
import yaml

from stages.report import (changed_params, decision_plot, most_changed, option_probability, read_yaml12, report,
                           rouge_plot, run_identity, side_by_side)

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
    all_scored = info(50)
    all_scored["decision"]["skipped"] = {"missing": 0, "not_an_option": 0}
    assert "; 50 questions scored.\n" in report(QUALITY, QUALITY, DELTAS, RECORDS, all_scored, IDENTITY, 0, 1000)
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
    assert "| 0.600 (+0.500) |\n\n#### q2: " in improved  # a blank line between two examples' tables
    assert "### Questions that changed" not in render(n_examples=0)


def test_control_characters_in_an_answer_show_as_escapes_and_leave_the_report_text():
    # A random or broken model can decode to NUL or a terminal escape: raw, grep calls the report a binary
    # file and a terminal prints garbage; escaped, a reviewer sees what the model emitted.
    records = [{**record("q1", 0.6, 0.1), "base_answer": "\x00시호흡\x1b[2J\tend\x7f"}]
    text = report(QUALITY, QUALITY, DELTAS, records, info(50), IDENTITY, 1, 1000)
    assert "| base | yes (0.93) | \\x00시호흡\\x1b[2J\tend\\x7f | 0.100 |" in text
    assert not any(unicodedata.category(c) == "Cc" for c in text.replace("\n", "").replace("\t", ""))


def test_confusion_matrices_of_both_models():
    text = render()
    fine_tuned = text.split("**Fine-tuned**")[1]
    assert "| yes | **3** | 1 | 0 | 4 |" in fine_tuned
    base = text.split("**Base**")[1].split("**Fine-tuned**")[0]
    assert "| yes | **5** | 0 | 0 | 5 |" in base  # recomputed from the records: all base decisions are yes


def test_side_by_side_refuses_other_questions():
    with pytest.raises(ValueError, match="^the base predictions are for other test questions$"):
        side_by_side([{"id": "1"}], [{"id": "2"}])
    merged = side_by_side([{"id": "1", "answer": "a"}], [{"id": "1", "answer": "b", "decision": "no"}])
    assert merged == [{"id": "1", "answer": "a", **{f"base_{k}": None for k in (
        "rouge1", "rouge2", "rougeL", "cut_off", "answer_nll", "answer_tokens", "option_logprobs")},
        "base_answer": "b", "base_decision": "no"}]


def test_changed_params_and_the_run_identity_from_git(tmp_path, monkeypatch):
    assert changed_params({"lora": {"r": 8, "alpha": 16}, "seed": 1}, {"lora": {"r": 16, "alpha": 16}, "seed": 1}) \
        == [("lora.r", 16, 8)]
    # a key only one side has (a param added to, or removed from, params.yaml) is a change too
    assert changed_params({"seed": 1, "eval": {"cache": "static"}}, {"seed": 1, "data": {"revision": "v1"}}) \
        == [("data.revision", "v1", None), ("eval.cache", None, "static")]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    params = {"model": {"name": "m", "base_16bit": "b"}, "lora": {"r": 16}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    outside_git = run_identity()
    assert outside_git["commit"] is None and outside_git["changed"] is None and outside_git["code_changed"] is False
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
    # `dvc exp run` sets the commit it started from; the report names that one, not the workspace's HEAD
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f00dfacecafe")
    assert run_identity()["commit"] == "f00dfac"


def test_code_changed_means_edits_to_tracked_stage_code_or_dvc_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = {"params.yaml": yaml.safe_dump({"model": {"name": "m", "base_16bit": "b"}}), "stages/train.py": "x = 1\n",
             "dvc.yaml": "stages: {}\n", "README.md": "read me\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    for command in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *command], check=True, capture_output=True)
    assert run_identity()["code_changed"] is False
    (tmp_path / "README.md").write_text("other\n", encoding="utf-8")  # not code
    (tmp_path / "stages/scratch.py").write_text("y = 2\n", encoding="utf-8")  # untracked: git status -uno skips it
    assert run_identity()["code_changed"] is False
    for name in ("stages/train.py", "dvc.yaml"):
        (tmp_path / name).write_text("edited\n", encoding="utf-8")
        assert run_identity()["code_changed"] is True, name
        subprocess.run(["git", "checkout", "--", name], check=True, capture_output=True)


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


# The whole report for three questions: one improved, one regressed without decisions, one unchanged
# whose final_decision is not an option. Intervals that touch 0 are no clear change.
YES_NO = {"yes": -0.1, "no": -3.0}  # P(yes) = 1 / (1 + e^-2.9) = 0.95
WHOLE_RECORDS = [
    record("q1", 0.6, 0.1, logprobs=YES_NO, base_logprobs=YES_NO),
    dict(record("q2", 0.2, 0.5, None, None, reference=None, logprobs=None, base_logprobs=None),
         question="line one\nline | two", base_answer=None),
    record("q3", 0.3, 0.3, None, None, reference="unsure", logprobs=None, base_logprobs=None),
]
WHOLE_INFO = {"test": {"n": 3}, "validation": {"n": 2},
              "decision": {"n": 1, "options": {"yes": "예", "no": "아니요"},
                           "skipped": {"missing": 1, "not_an_option": 1},
                           "confusion": {"yes": {"yes": 1, "no": 0}, "no": {"yes": 0, "no": 0}}},
              "generation": {"max_new_tokens": 64, "cut_off": 0}, "rouge": {"tokenizer": "char"}}
WHOLE_TUNED = {"test": {"accuracy": 1.0, "macro_f1": 1.0, "rougeL": 0.3667, "loss": 1.0}, "validation": {"loss": 1.1}}
WHOLE_BASE = {"test": {"accuracy": 1.0, "macro_f1": 1.0, "rougeL": 0.3, "loss": 1.5}, "validation": {"loss": 1.6}}
WHOLE_DELTAS = {"accuracy": {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0},
                "rougeL": {"delta": 0.0667, "ci_low": 0.0, "ci_high": 0.3},
                "loss": {"delta": -0.5, "ci_low": -0.7, "ci_high": 0.0}}
WHOLE_REPORT = """\
# Evaluation report

- **Run:** no git commit with uncommitted changes to stages/ or dvc.yaml
- **Models:** fine-tuned `m-4bit` (models/merged) against the base `m-16bit`
- **Params:** as committed
- **Test set:** 3 questions (validation: 2)

> **Small test set.** With 3 questions one question moves accuracy by 33.3 points: read the intervals, not the \
point values.

## Base vs fine-tuned

| metric | better | base | fine-tuned | change [95% interval] | verdict |
| --- | --- | ---: | ---: | --- | --- |
| decision accuracy | higher | 1.0000 | 1.0000 | +0.000 [+0.000, +0.000] | no clear change |
| decision macro-F1 | higher | 1.0000 | 1.0000 | +0.000 | no interval |
| ROUGE-L F1 | higher | 0.3000 | 0.3667 | +0.067 [+0.000, +0.300] | no clear change |
| answer loss (nats/token) | lower | 1.5000 | 1.0000 | \u22120.500 [\u22120.700, +0.000] | no clear change |
| validation answer loss | lower | 1.6000 | 1.1000 | \u22120.500 | no interval |

Change = fine-tuned minus base; the interval is a paired bootstrap over the test questions (200 resamples, \
seeded): **better** / **worse** when it excludes 0, else no clear change. Perplexity follows the loss; macro-F1, \
the cut share and validation have no interval. ROUGE: mean per-question F1 over `char` tokens. Decision: the \
option (예 (yes) / 아니요 (no)) with the highest log-likelihood as the whole reply; 1 questions scored, skipped: \
1 missing, 1 not an option final_decision.

Answers cut at max_new_tokens = 64: base 1 of 3, fine-tuned 0 of 3.

## Decisions

**Base** (rows: reference, columns: decision)

| | yes | no | total |
| --- | ---: | ---: | ---: |
| yes | **1** | 0 | 1 |
| no | 0 | **0** | 0 |

**Fine-tuned** (rows: reference, columns: decision)

| | yes | no | total |
| --- | ---: | ---: | ---: |
| yes | **1** | 0 | 1 |
| no | 0 | **0** | 0 |

## Questions that changed most against the base

Decision: the model's choice and (in brackets) the share of the options' probability it gives it.

### Improved most: ROUGE-L rose the most (1)

#### q1: question q1?

| | decision | answer | ROUGE-L |
| --- | --- | --- | ---: |
| reference | yes | reference q1 | |
| base | yes (0.95) | base answer q1 | 0.100 |
| fine-tuned | yes (0.95) | fine-tuned answer q1 | 0.600 (+0.500) |

### Regressed most: ROUGE-L fell the most (1)

#### q2: line one<br>line \\| two

| | decision | answer | ROUGE-L |
| --- | --- | --- | ---: |
| reference |  | reference q2 | |
| base |  | (none) | 0.500 |
| fine-tuned |  | fine-tuned answer q2 | 0.200 (\u22120.300) |

### Decisions fixed: the base was wrong, the fine-tuned model is right (0)

None.

### Decisions broken: the base was right, the fine-tuned model is wrong (0)

None.
"""


def test_the_whole_report_reads_as_written_here():
    # Markdown needs the blank lines (a table or heading glued to the line above does not render), the
    # header, separator and rows of a table must have as many cells, and a "|" in an answer must be escaped.
    identity = {**IDENTITY, "commit": None, "experiment": None, "code_changed": True, "changed": []}
    assert report(WHOLE_TUNED, WHOLE_BASE, WHOLE_DELTAS, WHOLE_RECORDS, WHOLE_INFO, identity, 1, 200) == WHOLE_REPORT


def test_a_metric_one_model_lacks_reads_n_a_and_a_change_needs_both():
    tuned = {"test": {"rougeL": 0.4}, "validation": {}}
    base = {"test": {"rougeL": 0.3, "loss": 1.5}, "validation": {}}
    text = report(tuned, base, {}, RECORDS, info(50), IDENTITY, 0, 1000)
    assert _row(text, "answer loss (nats/token)") == "| answer loss (nats/token) | lower | 1.5000 | n/a |  | no interval |"
    assert _row(text, "ROUGE-L F1") == "| ROUGE-L F1 | higher | 0.3000 | 0.4000 | +0.100 | no interval |"


def test_the_identity_line_says_what_git_could_not_tell_and_shortens_long_values():
    no_git = report(QUALITY, QUALITY, DELTAS, RECORDS, info(50), {**IDENTITY, "commit": None, "experiment": None,
                                                                  "changed": None}, 0, 1000)
    assert "- **Run:** no git commit\n" in no_git
    assert "- **Params:** no committed params.yaml to compare with\n" in no_git
    # json.dumps of "x" * 58 is 60 characters: shown whole; 61 are cut to 57 and "...". Korean stays readable.
    changed = [("prompt.system", "x" * 58, "y" * 59), ("data.source", "한국어", None)]
    text = report(QUALITY, QUALITY, DELTAS, RECORDS, info(50), {**IDENTITY, "changed": changed}, 0, 1000)
    assert (f"- **Params changed from the commit:** `prompt.system` \"{'x' * 58}\" \u2192 \"{'y' * 56}...; "
            "`data.source` \"한국어\" \u2192 null\n") in text


def test_small_test_set_warning_below_100_questions_and_its_arithmetic():
    assert "one question moves accuracy by 12.5 points" in render(n=8)
    assert "Small test set" in render(n=99) and "Small test set" not in render(n=100)


def test_a_report_without_examples_ends_with_one_newline():
    text = render(n_examples=0)
    assert text.endswith("| 1 |\n") and not text.endswith("\n\n")  # the last confusion row, no blank lines


def test_only_n_examples_per_section():
    text = render(n_examples=1)
    improved = text.split("\n### Improved most")[1].split("\n### ")[0]
    assert "q1:" in improved and "q2:" not in improved


def test_decisions_need_both_models_decided():
    # The fine-tuned run scored decisions but the base predictions have none (or the other way round):
    # no confusion matrices, and the base's missing decisions are not counted as flips.
    records = [dict(r, base_decision=None, base_option_logprobs=None) for r in RECORDS]
    text = report(QUALITY, QUALITY, DELTAS, records, info(50), IDENTITY, 2, 1000)
    assert "\n## Decisions\n" not in text
    tuned_right = [record("q", 0.2, 0.2, "yes", None, base_logprobs=None)]
    assert most_changed(tuned_right, 5)["fixed"] == []


def test_plot_rows_pair_each_question_and_skip_unscored_decisions():
    records = [record("q1", 0.6, 0.1, "no", "yes"),
               record("q2", 0.2, 0.5, None, None, reference=None, logprobs=None, base_logprobs=None),
               record("q3", 0.3, 0.3, "yes", None, base_logprobs=None)]
    assert decision_plot(records) == [{"id": "q1", "reference": "yes", "base": "yes", "fine_tuned": "no"}]
    assert rouge_plot(records) == [{"id": "q1", "base": 0.1, "fine_tuned": 0.6},
                                   {"id": "q2", "base": 0.5, "fine_tuned": 0.2},
                                   {"id": "q3", "base": 0.3, "fine_tuned": 0.3}]


def test_the_verdict_rule_needs_an_interval_that_excludes_0():
    from stages.headline import verdict

    interval = lambda low, high: {"delta": (low + high) / 2, "ci_low": low, "ci_high": high}  # noqa: E731
    assert verdict(interval(0.01, 0.2), "higher") == "better"
    assert verdict(interval(0.01, 0.2), "lower") == "worse"
    assert verdict(interval(-0.2, -0.01), "lower") == "better"
    assert verdict(interval(-0.2, -0.01), "higher") == "worse"
    # a positive change whose interval touches or spans 0 is no verdict in either direction
    assert verdict(interval(0.0, 0.3), "higher") == "no clear change"
    assert verdict(interval(-0.3, 0.0), "lower") == "no clear change"
    assert verdict(interval(-0.01, 0.3), "higher") == "no clear change"
    # no interval (or not a number) is not a verdict
    assert verdict(None, "higher") == "no interval"
    assert verdict({"delta": 0.1, "ci_low": None, "ci_high": None}, "higher") == "no interval"
    assert verdict(interval(float("nan"), 0.3), "higher") == "no interval"
    with pytest.raises(ValueError):
        verdict(interval(0.1, 0.2), "up")
