"""metrics/report.md: what a reviewer reads to decide whether a fine-tuning run is better.

Run identity, base vs fine-tuned with each change's 95% interval and which direction is better,
the decision confusion matrices, and the questions that improved and regressed most against the
base, with the reference, base and fine-tuned answers side by side. Also the per-question data
behind the DVC plots. Pure functions except `run_identity`, which asks git.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import unicodedata
from pathlib import Path

import yaml

from stages.decision import both_decided, decision_metrics
from stages.headline import verdict
from stages.rouge import ROUGE_TYPES

# Fields of a prediction record that belong to the model that answered (the rest is the question).
MODEL_FIELDS = ("answer", *ROUGE_TYPES, "cut_off", "answer_nll", "answer_tokens", "decision", "option_logprobs")
SMALL_N = 100  # fewer test questions than this gets a warning in the report

# (split, metric, label, +1 if higher is better else -1): the order of the report's table.
TABLE = [
    ("test", "accuracy", "decision accuracy", +1),
    ("test", "macro_f1", "decision macro-F1", +1),
    ("test", "rouge1", "ROUGE-1 F1", +1),
    ("test", "rouge2", "ROUGE-2 F1", +1),
    ("test", "rougeL", "ROUGE-L F1", +1),
    ("test", "loss", "answer loss (nats/token)", -1),
    ("test", "perplexity", "answer perplexity", -1),
    ("test", "cut_off", "answers cut at max_new_tokens (share)", -1),
    ("validation", "loss", "validation answer loss", -1),
    ("validation", "perplexity", "validation answer perplexity", -1),
]


def side_by_side(predictions: list[dict], base_predictions: list[dict]) -> list[dict]:
    """Each fine-tuned record with the base model's fields for the same question, prefixed `base_`."""
    base_by_id = {p["id"]: p for p in base_predictions}
    if set(base_by_id) != {p["id"] for p in predictions}:
        raise ValueError("the base predictions are for other test questions")
    return [{**p, **{f"base_{field}": base_by_id[p["id"]].get(field) for field in MODEL_FIELDS}} for p in predictions]


def decision_plot(records: list[dict]) -> list[dict]:
    """Rows for DVC's confusion template: reference vs each model's decision, scored rows only."""
    return [{"id": r["id"], "reference": r["reference_decision"], "base": r["base_decision"], "fine_tuned": r["decision"]}
            for r in both_decided(records)]


def rouge_plot(records: list[dict]) -> list[dict]:
    """Rows for DVC's scatter template: per-question ROUGE-L of the base (x) and fine-tuned (y)."""
    return [{"id": r["id"], "base": r["base_rougeL"], "fine_tuned": r["rougeL"]} for r in records]


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_params(current: dict, committed: dict) -> list[tuple[str, object, object]]:
    """(key, committed value, current value) for every params key that differs, sorted by key."""
    now, before = _flatten(current), _flatten(committed)
    return [(key, before.get(key), now.get(key)) for key in sorted(set(now) | set(before))
            if now.get(key) != before.get(key)]


class _Yaml12Loader(yaml.SafeLoader):
    """params.yaml as DVC reads it (YAML 1.2): only true / false are booleans.

    `dvc exp run -S` rewrites params.yaml and drops the quotes around the `yes` and `no` keys of
    eval.decision_options; read as YAML 1.1 they would turn into booleans and show up as changed.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def read_yaml12(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader: plain data only


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout


def run_identity(params_file: str = "params.yaml") -> dict:
    """The commit, the DVC experiment (when run by `dvc exp run`), and the params that differ
    from the commit's params.yaml: what produced this report."""
    current = read_yaml12(Path(params_file).read_text(encoding="utf-8"))
    commit = (os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD") or "").strip()
    committed_text = _git("show", f"HEAD:{params_file}")
    return {
        "commit": commit[:7] or None,
        "experiment": os.environ.get("DVC_EXP_NAME"),
        "code_changed": bool((_git("status", "--porcelain", "--untracked-files=no", "--", "stages", "dvc.yaml")
                              or "").strip()),
        "changed": None if committed_text is None else changed_params(current, read_yaml12(committed_text) or {}),
        "model": current["model"]["name"],
        "base": current["model"]["base_16bit"],
    }


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "\u2212")


def _change(tuned, base, delta: dict | None) -> str:
    """'+0.021 [−0.004, +0.046]': the change with its interval, or the bare change without one."""
    if delta is not None:
        return f"{_signed(delta['delta'])} [{_signed(delta['ci_low'])}, {_signed(delta['ci_high'])}]"
    if tuned is None or base is None:
        return ""
    return _signed(tuned - base)


def _quote(text) -> str:
    """Text for one table cell: line breaks as <br>, "|" escaped, control characters as visible escapes.

    A model's answer can hold anything its tokenizer decodes to, NUL and terminal escapes included:
    raw, they make the report a binary file to grep and garble a terminal or a renderer.
    """
    text = "<br>".join(str("(none)" if text is None else text).splitlines()).replace("|", "\\|")
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" and c != "\t" else c for c in text)


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _identity_lines(identity: dict) -> list[str]:
    run = f"commit `{identity['commit']}`" if identity["commit"] else "no git commit"
    if identity["experiment"]:
        run = f"experiment `{identity['experiment']}` on {run}"
    if identity["code_changed"]:
        run += " with uncommitted changes to stages/ or dvc.yaml"
    lines = [f"- **Run:** {run}",
             f"- **Models:** fine-tuned `{identity['model']}` (models/merged) against the base `{identity['base']}`"]
    changed = identity["changed"]
    if changed is None:
        lines.append("- **Params:** no committed params.yaml to compare with")
    elif not changed:
        lines.append("- **Params:** as committed")
    else:
        lines.append("- **Params changed from the commit:** " + "; ".join(
            f"`{key}` {_short(old)} \u2192 {_short(new)}" for key, old, new in changed))
    return lines


def _confusion_lines(title: str, confusion: dict) -> list[str]:
    labels = list(confusion)
    lines = [f"**{title}** (rows: reference, columns: decision)", "",
             "| | " + " | ".join(labels) + " | total |", "| --- |" + " ---: |" * (len(labels) + 1)]
    for reference in labels:
        row = [confusion[reference][decision] for decision in labels]
        cells = [f"**{n}**" if decision == reference else str(n) for n, decision in zip(row, labels)]
        lines.append(f"| {reference} | " + " | ".join(cells) + f" | {sum(row)} |")
    return lines + [""]


def option_probability(option_logprobs: dict | None, label: str | None) -> float | None:
    """The share of the options' probability the model gives `label` (softmax over the options)."""
    if not option_logprobs or label not in option_logprobs:
        return None
    top = max(option_logprobs.values())
    return math.exp(option_logprobs[label] - top) / sum(math.exp(v - top) for v in option_logprobs.values())


def _decision_text(decision, option_logprobs) -> str:
    probability = option_probability(option_logprobs, decision)
    return "" if decision is None else f"{decision} ({probability:.2f})"


def _example_lines(record: dict) -> list[str]:
    change = record["rougeL"] - record["base_rougeL"]
    return [
        f"#### {record['id']}: {_quote(record['question'])}", "",
        "| | decision | answer | ROUGE-L |", "| --- | --- | --- | ---: |",
        f"| reference | {record['reference_decision'] or ''} | {_quote(record['reference'])} | |",
        f"| base | {_decision_text(record['base_decision'], record['base_option_logprobs'])} | "
        f"{_quote(record['base_answer'])} | {record['base_rougeL']:.3f} |",
        f"| fine-tuned | {_decision_text(record['decision'], record['option_logprobs'])} | "
        f"{_quote(record['answer'])} | {record['rougeL']:.3f} ({_signed(change)}) |", "",
    ]


def most_changed(records: list[dict], n: int) -> dict[str, list[dict]]:
    """The questions that changed most against the base: by ROUGE-L, and by decision flips.

    improved / regressed: the largest rise / fall in ROUGE-L, largest first. fixed / broken: the
    decision became right / wrong, ordered by the largest rise / fall of the probability the
    model gives the reference option.
    """
    def rouge_change(r):
        return r["rougeL"] - r["base_rougeL"]

    def reference_gain(r):
        return (option_probability(r["option_logprobs"], r["reference_decision"])
                - option_probability(r["base_option_logprobs"], r["reference_decision"]))

    decided = both_decided(records)
    fixed = [r for r in decided if r["decision"] == r["reference_decision"] != r["base_decision"]]
    broken = [r for r in decided if r["base_decision"] == r["reference_decision"] != r["decision"]]
    return {
        "improved": sorted((r for r in records if rouge_change(r) > 0), key=lambda r: (-rouge_change(r), r["id"]))[:n],
        "regressed": sorted((r for r in records if rouge_change(r) < 0), key=lambda r: (rouge_change(r), r["id"]))[:n],
        "fixed": sorted(fixed, key=lambda r: (-reference_gain(r), r["id"]))[:n],
        "broken": sorted(broken, key=lambda r: (reference_gain(r), r["id"]))[:n],
    }


SECTIONS = {
    "improved": "Improved most: ROUGE-L rose the most",
    "regressed": "Regressed most: ROUGE-L fell the most",
    "fixed": "Decisions fixed: the base was wrong, the fine-tuned model is right",
    "broken": "Decisions broken: the base was right, the fine-tuned model is wrong",
}


def report(tuned: dict, base: dict, deltas: dict, records: list[dict], info: dict, identity: dict,
           n_examples: int, bootstrap_samples: int, plots: dict[str, str] | None = None) -> str:
    """The markdown report. `tuned` / `base`: quality metrics (split -> metric); `deltas`: the
    paired bootstrap per test metric; `records`: side_by_side; `info`: the fine-tuned run's counts;
    `plots`: {title: link} of the PNGs the plots stage draws, listed at the end."""
    n, decision = info["test"]["n"], info["decision"]
    base_pairs = [(r["reference_decision"], r["base_decision"]) for r in records if r["base_decision"] is not None]
    lines = ["# Evaluation report", "", *_identity_lines(identity),
             f"- **Test set:** {n} questions (validation: {info['validation']['n']})", ""]
    if n < SMALL_N:
        lines += [f"> **Small test set.** With {n} questions one question moves accuracy by "
                  f"{100 / n:.1f} points: read the intervals, not the point values.", ""]
    lines += ["## Base vs fine-tuned", "",
              "| metric | better | base | fine-tuned | change [95% interval] | verdict |",
              "| --- | --- | ---: | ---: | --- | --- |"]
    for split, name, label, direction in TABLE:
        tuned_value, base_value = tuned[split].get(name), base[split].get(name)
        if tuned_value is None and base_value is None:
            continue
        delta = deltas.get(name) if split == "test" else None
        better = "higher" if direction > 0 else "lower"
        said = verdict(delta, better)
        said = f"**{said}**" if said in ("better", "worse") else said
        lines.append(f"| {label} | {better} | {_number(base_value)} | {_number(tuned_value)} | "
                     f"{_change(tuned_value, base_value, delta)} | {said} |")
    options = " / ".join(f"{word} ({label})" for label, word in decision["options"].items())
    skipped = ", ".join(f"{count} {why.replace('_', ' ')}" for why, count in decision["skipped"].items() if count)
    lines += ["", f"Change = fine-tuned minus base; the interval is a paired bootstrap over the test questions "
              f"({bootstrap_samples} resamples, seeded): **better** / **worse** when it excludes 0, else no clear "
              "change. Perplexity follows the loss; macro-F1, the cut share and validation have no interval. "
              f"ROUGE: mean per-question F1 over `{info['rouge']['tokenizer']}` tokens. Decision: the option "
              f"({options}) with the highest log-likelihood as the whole reply; {decision['n']} questions scored"
              + (f", skipped: {skipped} final_decision." if skipped else "."), "",
              f"Answers cut at max_new_tokens = {info['generation']['max_new_tokens']}: base "
              f"{sum(bool(r['base_cut_off']) for r in records)} of {n}, fine-tuned {info['generation']['cut_off']} of {n}.", ""]
    if decision["n"] and base_pairs:
        base_confusion = decision_metrics(base_pairs, list(decision["options"]))["confusion"]
        lines += ["## Decisions", "", *_confusion_lines("Base", base_confusion),
                  *_confusion_lines("Fine-tuned", decision["confusion"])]
    if n_examples:
        lines += ["## Questions that changed most against the base", "",
                  "Decision: the model's choice and (in brackets) the share of the options' probability it gives it."]
        for key, chosen in most_changed(records, n_examples).items():
            lines += ["", f"### {SECTIONS[key]} ({len(chosen)})", ""]
            lines += [line for record in chosen for line in _example_lines(record)][:-1] or ["None."]
    if plots:
        lines += ["", "## Plots", "", *(f"- [{title}]({link})" for title, link in plots.items())]
    return "\n".join(lines).rstrip("\n") + "\n"
