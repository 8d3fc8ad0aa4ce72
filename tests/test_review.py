"""Reviewing a change: offline PNG plots, the pull-request comment and the workflow that posts it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import paths
from stages.headline import HEADLINE
from stages.plots import draw, figure, file_name

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_every_plot_is_drawn_as_a_png_with_the_network_blocked(pipeline_run, tmp_path, monkeypatch):
    # pipeline_run ran the plots stage in-process with socket.connect refused
    assert json.loads((pipeline_run / ".network_attempts.json").read_text()) == []
    drawn = sorted(p.name for p in (pipeline_run / paths.PLOTS_DIR).iterdir())
    assert drawn == ["decisions-of-the-base-model.png", "decisions-of-the-fine-tuned-model.png", "eval-loss.png",
                     "loss-per-optimizer-step.png", "rouge-l-per-test-question-base-x-vs-fine-tuned-y.png",
                     "train-grad-norm.png", "train-learning-rate.png", "train-loss.png"]
    for name in drawn:
        data = (pipeline_run / paths.PLOTS_DIR / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name  # a drawn figure, not an empty canvas
    # the report, written before the plots stage runs, links dvc.yaml's plots where that stage draws them
    report = (pipeline_run / paths.REPORT).read_text(encoding="utf-8")
    linked = re.findall(r"^- \[[^]]+\]\((plots/[^)]+)\)$", report, flags=re.M)
    assert len(linked) == 4 and all((pipeline_run / "metrics" / link).is_file() for link in linked), linked

    # identical data, identical bytes: a rerun leaves the git-tracked PNGs alone
    from stages import plots

    copy = tmp_path / "ws"
    shutil.copytree(pipeline_run, copy, symlinks=True)
    monkeypatch.chdir(copy)
    shutil.rmtree(paths.PLOTS_DIR)
    plots.main([])
    for name in drawn:
        assert (copy / paths.PLOTS_DIR / name).read_bytes() == (pipeline_run / paths.PLOTS_DIR / name).read_bytes()


def _confusion(points, classes=("yes", "no", "maybe"), revisions=("workspace",)):
    points = [{"actual": a, "predicted": p, "rev": rev, "filename": "eval/decisions.json"}
              for rev in revisions for a, p in points]
    return {"title": "Decisions", "template": "confusion", "x": "actual", "y": "predicted",
            "x_label": "actual", "y_label": "predicted", "points": points, "classes": list(classes)}


def _heatmaps(drawn) -> dict[str, dict]:
    """Each heatmap panel of a figure, read back from its artists: title, row and column labels,
    the image's counts and the count written in each cell."""
    panels = {}
    for axes in (a for a in drawn.axes if a.images):
        cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in axes.texts}
        panels[axes.get_title()] = {
            "rows": [t.get_text() for t in axes.get_yticklabels()],
            "columns": [t.get_text() for t in axes.get_xticklabels()],
            "counts": axes.images[0].get_array().tolist(),
            "cells": [[cells[i, j] for j in range(len(axes.get_xticklabels()))]
                      for i in range(len(axes.get_yticklabels()))],
            "y_label": axes.get_ylabel(),
        }
    return panels


def test_a_confusion_heatmap_has_reference_rows_decision_columns_in_the_options_order(tmp_path):
    plot = _confusion([("yes", "yes"), ("yes", "no"), ("no", "no"), ("maybe", "no")])
    [panel] = _heatmaps(figure(plot)).values()
    assert panel["rows"] == panel["columns"] == ["yes", "no", "maybe"]  # as eval.decision_options, not sorted
    assert panel["y_label"] == "actual (rows)"
    assert panel["counts"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]  # row: the reference, column: the decision
    assert panel["cells"] == [[str(n) for n in row] for row in panel["counts"]]
    # a label outside the classes still gets its row and column, after them
    assert _heatmaps(figure(_confusion([("yes", "unsure")])))["Decisions"]["rows"] == ["yes", "no", "maybe", "unsure"]
    draw(plot, tmp_path / file_name(plot["title"]))
    assert (tmp_path / "decisions.png").read_bytes().startswith(PNG)


def test_two_revisions_get_a_panel_or_a_series_each_labelled_with_the_revision():
    panels = _heatmaps(figure(_confusion([("yes", "no")], revisions=("HEAD~1", "workspace"))))
    assert sorted(panels) == ["HEAD~1", "workspace"]
    curve = {"title": "Loss", "template": "linear", "x": "step", "y": "loss", "x_label": "step", "y_label": "loss",
             "points": [{"step": s, "loss": 1.0 / s, "rev": rev, "filename": f"{name}/loss.tsv"}
                        for rev in ("HEAD~1", "workspace") for name in ("train", "eval") for s in (1, 2)]}
    [axes] = figure(curve).axes
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [
        "HEAD~1 train/loss.tsv", "HEAD~1 eval/loss.tsv", "workspace train/loss.tsv", "workspace eval/loss.tsv"]


def test_the_rouge_scatter_has_the_diagonal_and_says_which_side_is_better():
    plot = {"title": "ROUGE-L", "template": "scatter", "x": "base", "y": "fine_tuned", "x_label": "base",
            "y_label": "fine_tuned", "points": [{"base": b, "fine_tuned": f, "rev": "workspace"}
                                                for b, f in [(0.1, 0.3), (0.4, 0.2), (0.0, 0.0)]]}
    [axes] = figure(plot).axes
    [diagonal] = axes.get_lines()
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata()) == [0.0, 0.4]
    assert diagonal.get_label() == "y = x: above, fine_tuned better; below, base better"
    assert diagonal.get_label() in [t.get_text() for t in axes.get_legend().get_texts()]


def _report_matrix(report: str, title: str) -> tuple[list[str], list[list[int]]]:
    """Labels and counts of one confusion table of metrics/report.md (rows: reference, columns: decision)."""
    lines = report.splitlines()
    header = lines.index(f"**{title}** (rows: reference, columns: decision)") + 2
    labels = [cell.strip() for cell in lines[header].strip("|").split("|")][1:-1]
    rows = [[cell.strip().strip("*") for cell in line.strip("|").split("|")]
            for line in lines[header + 2:header + 2 + len(labels)]]
    assert [row[0] for row in rows] == labels
    return labels, [[int(cell) for cell in row[1:-1]] for row in rows]


def test_the_plotted_confusion_cells_equal_the_reports_matrices(pipeline_run, monkeypatch):
    from stages.plots import plot_data

    monkeypatch.chdir(pipeline_run)
    report = (pipeline_run / paths.REPORT).read_text(encoding="utf-8")
    by_title = {plot["title"]: plot for plot in plot_data()}
    for title, table in (("Decisions of the base model", "Base"), ("Decisions of the fine-tuned model", "Fine-tuned")):
        labels, counts = _report_matrix(report, table)
        [panel] = _heatmaps(figure(by_title[title])).values()
        assert panel["rows"] == panel["columns"] == labels
        assert panel["counts"] == counts and panel["cells"] == [[str(n) for n in row] for row in counts]
        assert panel["y_label"] == "reference (rows)"


def test_plot_names_are_short_and_stable():
    assert file_name("Loss per optimizer step") == "loss-per-optimizer-step.png"
    assert file_name("dvclive/train/plots/metrics/eval/loss.tsv") == "eval-loss.png"


# --- the pull-request comment, on a temporary repository with two commits -----------------------

BASE_METRICS = {
    "metrics/train.json": {"train": {"loss": 1.5, "eval_loss_best": 1.4, "eval_loss_last": 1.45}},
    "metrics/cost/train.json": {"train": {"tokens_per_s": 900.0, "runtime_s": 60.0}},
    "metrics/eval.json": {"tuned": {"test": {"rougeL": 0.20, "loss": 1.3}}},  # no decision accuracy yet
}
HEAD_METRICS = {
    "metrics/train.json": {"train": {"loss": 1.2, "eval_loss_best": 1.5, "eval_loss_last": 1.5}},
    "metrics/cost/train.json": {"train": {"tokens_per_s": 1100.0, "runtime_s": 50.0}},
    "metrics/eval.json": {"tuned": {"test": {"rougeL": 0.25, "loss": 1.3, "accuracy": 0.6}}},
}
REPORT = """# Evaluation report

- **Run:** commit `abc1234`
- **Test set:** 5 questions (validation: 5)

> **Small test set.** With 5 questions one question moves accuracy by 20.0 points: read the intervals.

## Base vs fine-tuned

| metric | better | base | fine-tuned | change [95% interval] | verdict |
| --- | --- | ---: | ---: | --- | --- |
| ROUGE-L F1 | higher | 0.1000 | 0.2500 | +0.150 [+0.050, +0.250] | **better** |

Change = fine-tuned minus base.

## Decisions

| | yes | no | total |
"""


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def _write_result(repo: Path, metrics: dict, losses: list[float]) -> None:
    for name, content in metrics.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(json.dumps(content), encoding="utf-8")
    for curve in ("train", "eval"):
        tsv = repo / "dvclive/train/plots/metrics" / curve / "loss.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        tsv.write_text("step\tloss\n" + "".join(f"{i + 1}\t{v}\n" for i, v in enumerate(losses)), encoding="utf-8")


def _empty_project(repo: Path) -> None:
    """A git + DVC repository holding the project's dvc.yaml and params.yaml, nothing committed."""
    from tools.smoke import dvc_environment

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, repo / name)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@localhost")
    _git(repo, "config", "user.name", "t")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=dvc_environment())


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory) -> Path:
    """The project's dvc.yaml and params.yaml; a base commit, then a commit that changes lora.r and
    the results (as after `dvc exp run -S lora.r=8` and a commit). Nothing is trained."""
    from tools.smoke import write_params

    repo = tmp_path_factory.mktemp("review") / "repo"
    repo.mkdir()
    _empty_project(repo)
    _write_result(repo, BASE_METRICS, [2.0, 1.8, 1.5])
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    write_params(repo / "params.yaml", {"lora.r": 8})
    _write_result(repo, HEAD_METRICS, [2.0, 1.6, 1.2])
    (repo / "metrics/report.md").write_text(REPORT, encoding="utf-8")
    (repo / paths.PLOTS_DIR).mkdir()
    (repo / paths.PLOTS_DIR / "train-loss.png").write_bytes(PNG)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "rank 8")
    return repo


def review(repo: Path, *args: str) -> subprocess.CompletedProcess:
    from tools.smoke import dvc_environment

    env = {**dvc_environment(), "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "tools.review", *args], cwd=repo, capture_output=True,
                          text=True, env=env)


def test_the_review_comment_compares_params_headline_metrics_report_and_plots(two_commits, tmp_path):
    result = review(two_commits, "HEAD~1", "--out", "comment.md", "--plots-dir", "review-plots",
                    "--link-base", "https://example.org/blob/abc")
    assert result.returncode == 0, result.stderr
    text = (two_commits / "comment.md").read_text(encoding="utf-8")
    lines = text.splitlines()

    # dvc params diff --md
    assert any(line.replace(" ", "") == "|params.yaml|lora.r|16|8|" for line in lines), text
    # headline metrics, with direction: lower train loss is better, higher ROUGE-L is better
    row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines
           if line.startswith("| `")}
    # a change without a paired interval (no per-question predictions here) is no verdict
    assert row["`train.loss` (lower is better)"] == ["1.5000", "1.2000", "-0.3000", "no interval"]
    assert row["`train.eval_loss_best` (lower is better)"] == ["1.4000", "1.5000", "+0.1000", "no interval"]
    assert row["`tuned.test.rougeL` (higher is better)"] == ["0.2000", "0.2500", "+0.0500", "no interval"]
    assert row["`tuned.test.loss` (lower is better)"] == ["1.3000", "1.3000", "+0.0000", "no interval"]
    assert row["`tuned.test.accuracy` (higher is better)"] == ["n/a", "0.6000", "n/a", "no interval"]
    # fine-tuned minus base within each revision: a table of its own, n/a where a revision has none
    assert row["`vs_base.test.rougeL` (higher is better)"] == ["n/a", "n/a"]
    within = [m for m in HEADLINE if m.key.startswith("vs_base.") and m.key.endswith(".delta")]
    assert len(row) == len([m for m in HEADLINE if not m.key.startswith("vs_base.")]) + len(within)
    # the cost moved too, folded away with the other changed metrics
    assert "| metrics/cost/train.json | `train.tokens_per_s` | 900.0000 | 1,100.0 |" in lines
    # the report's summary table, and the plots: the committed PNG linked, both revisions drawn
    assert "| ROUGE-L F1 | higher | 0.1000 | 0.2500 | +0.150 [+0.050, +0.250] | **better** |" in lines
    assert "| | yes | no | total |" not in lines  # only the summary table
    assert "[train-loss](https://example.org/blob/abc/metrics/plots/train-loss.png)" in text
    drawn = sorted(p.name for p in (two_commits / "review-plots").iterdir())
    assert "loss-per-optimizer-step.png" in drawn
    assert "![loss-per-optimizer-step](review-plots/loss-per-optimizer-step.png)" in lines


def test_plots_of_two_revisions_are_drawn_together(two_commits, tmp_path):
    from tools.smoke import dvc_environment

    result = subprocess.run([sys.executable, "-m", "stages.plots", "HEAD~1", "-o", str(tmp_path / "plots")],
                            cwd=two_commits, capture_output=True, text=True,
                            env={**dvc_environment(), "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    from stages.plots import plot_data

    [combined] = [p for p in plot_data(["HEAD~1"], root=two_commits) if p["title"] == "Loss per optimizer step"]
    assert {point["rev"] for point in combined["points"]} == {"HEAD~1", "workspace"}
    assert (tmp_path / "plots/loss-per-optimizer-step.png").read_bytes().startswith(PNG)


def test_the_review_comments_plots_hold_both_revisions(two_commits, tmp_path, monkeypatch):
    from stages import plots
    from tools.review import plots_section

    drawn, real = [], plots.figure
    monkeypatch.setattr(plots, "figure", lambda plot: drawn.append(real(plot)) or drawn[-1])
    monkeypatch.chdir(two_commits)
    lines = plots_section("HEAD~1", "", tmp_path / "plots")
    assert len(drawn) == len([line for line in lines if line.startswith("![")]) > 0
    for one in drawn:  # every figure, read back from its legend: a series from each revision
        [axes] = one.axes
        assert {text.get_text().split()[0] for text in axes.get_legend().get_texts()} == {"HEAD~1", "workspace"}


def test_an_unknown_base_is_one_line(two_commits):
    result = review(two_commits, "no-such-branch")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: `dvc metrics diff no-such-branch --all --json` failed: ERROR: unknown Git revision 'no-such-branch'"]


def test_the_workflow_posts_the_same_command_on_pull_requests():
    workflow = yaml.safe_load((ROOT / ".github/workflows/review.yml").read_text(encoding="utf-8"))
    assert "pull_request" in workflow[True]  # YAML 1.1 reads the key `on` as true
    assert workflow["permissions"]["pull-requests"] == "write"
    [job] = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"  # no GPU: the metrics, curves and report are in git
    runs = [step.get("run", "") for step in job["steps"]]
    assert any(step.get("with", {}).get("fetch-depth") == 0 for step in job["steps"])  # the base branch too
    [command] = [r for r in runs if "python -m tools.review" in r]
    assert command.split()[:4] == ["python", "-m", "tools.review", "origin/${{"]
    assert any(r.startswith("cml comment update") and "review.md" in r for r in runs)
    # and `make review` runs the same module
    assert "-m tools.review $(BASE)" in (ROOT / "Makefile").read_text(encoding="utf-8")


# --- one rule for verdicts: the report, the comment and the experiment table on the same run ----

def _five_questions(tuned_rouge: list[float], tuned_nll: list[float]) -> list[dict]:
    """Side-by-side records of 5 test questions; the base model's answers are the same in every run."""
    base_rouge, base_nll = [0.1, 0.3, 0.4, 0.2, 0.3], [2.0, 2.0, 2.0, 2.0, 2.0]
    decisions = ["yes", "no", "yes", "no", "yes"]
    records = []
    for k in range(5):
        model = {"rouge1": tuned_rouge[k], "rouge2": tuned_rouge[k], "rougeL": tuned_rouge[k], "answer": f"a{k}",
                 "cut_off": False, "answer_nll": tuned_nll[k], "answer_tokens": 10, "decision": decisions[k],
                 "option_logprobs": {"yes": -1.0, "no": -1.0}}
        base = {"rouge1": base_rouge[k], "rouge2": base_rouge[k], "rougeL": base_rouge[k], "answer": f"b{k}",
                "cut_off": False, "answer_nll": base_nll[k], "answer_tokens": 10, "decision": decisions[k],
                "option_logprobs": {"yes": -1.0, "no": -1.0}}
        records.append({"id": f"q{k}", "question": f"q{k}?", "reference": f"r{k}", "reference_decision": "yes",
                        **model, **{f"base_{field}": value for field, value in base.items()}})
    return records


def _write_run(repo: Path, records: list[dict]) -> None:
    """What the evaluate stage writes from these records: eval.json, predictions.jsonl and the report."""
    from stages.bootstrap import paired_deltas
    from stages.decision import decision_summary
    from stages.outputs import dumps_json, jsonl_text
    from stages.params import load_params
    from stages.report import report
    from stages.rouge import mean_scores

    params = load_params(repo / "params.yaml")
    options = {"yes": "예", "no": "아니요"}

    def quality(prefix):
        model = [{"id": r["id"], "reference_decision": r["reference_decision"],
                  **{k: r[f"{prefix}{k}"] for k in ("rouge1", "rouge2", "rougeL", "decision")}} for r in records]
        loss = sum(r[f"{prefix}answer_nll"] for r in records) / sum(r[f"{prefix}answer_tokens"] for r in records)
        return {"test": {"loss": loss, **mean_scores(model), **decision_summary(model, options)[0]}}, model

    (tuned, model), (base, _) = quality(""), quality("base_")
    deltas = paired_deltas(records, params.eval.bootstrap_samples, params.seed)
    info = {"test": {"n": 5}, "validation": {"n": 5}, "decision": decision_summary(model, options)[1],
            "generation": {"max_new_tokens": 8, "cut_off": 0}, "rouge": {"tokenizer": "char"}}
    identity = {"commit": None, "experiment": None, "code_changed": False, "changed": [], "model": "m", "base": "b"}
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / paths.EVAL_METRICS).write_text(dumps_json({"tuned": tuned, "vs_base": {"test": deltas}}))
    (repo / paths.PREDICTIONS).write_text(jsonl_text(records), encoding="utf-8")
    (repo / paths.REPORT).write_text(report({**tuned, "validation": {}}, {**base, "validation": {}}, deltas,
                                            records, info, identity, 0, params.eval.bootstrap_samples))


@pytest.fixture(scope="module")
def untrained_then_tuned(tmp_path_factory) -> Path:
    """A base commit whose "fine-tuned" model answers as the base model does (an untrained adapter),
    then a commit whose fine-tuned model does better on 5 questions: ROUGE-L up, but on so few
    questions that its interval spans 0; the answer loss lower on every question."""
    repo = tmp_path_factory.mktemp("verdicts") / "repo"
    repo.mkdir()
    _empty_project(repo)
    _write_run(repo, _five_questions([0.1, 0.3, 0.4, 0.2, 0.3], [2.0] * 5))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "untrained")
    _write_run(repo, _five_questions([0.5, 0.3, 0.2, 0.6, 0.3], [1.5, 1.6, 1.7, 1.4, 1.5]))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "tuned")
    return repo


def test_the_report_the_comment_and_the_experiment_table_give_one_verdict(untrained_then_tuned, tmp_path):
    repo = untrained_then_tuned
    vs_base = json.loads((repo / paths.EVAL_METRICS).read_text())["vs_base"]["test"]
    # the premise: ROUGE-L rose, but its interval spans 0; the loss fell with an interval below 0
    assert vs_base["rougeL"]["delta"] > 0 and vs_base["rougeL"]["ci_low"] <= 0 <= vs_base["rougeL"]["ci_high"]
    assert vs_base["loss"]["ci_high"] < 0

    report_rows = {line.split("|")[1].strip(): line.split("|")[-2].strip()
                   for line in (repo / paths.REPORT).read_text(encoding="utf-8").splitlines() if line.startswith("| ")}
    assert report_rows["ROUGE-L F1"] == "no clear change"
    assert report_rows["answer loss (nats/token)"] == "**better**"
    assert report_rows["decision macro-F1"] == "no interval"

    result = review(repo, "HEAD~1")
    assert result.returncode == 0, result.stderr
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in result.stdout.splitlines() if line.startswith("| `")}
    # this revision minus the untrained one is, question by question, fine-tuned minus base: the same
    # pairs, resamples and seed give the same interval and the same verdict as the report's
    rouge = cells["`tuned.test.rougeL` (higher is better)"]
    ci = f"[{vs_base['rougeL']['ci_low']:+.4f}, {vs_base['rougeL']['ci_high']:+.4f}]"
    assert rouge[2] == f"{vs_base['rougeL']['delta']:+.4f} {ci}" and rouge[3] == "no clear change"
    assert cells["`tuned.test.loss` (lower is better)"][3] == "better"
    assert cells["`train.loss` (lower is better)"][3] == "no interval"  # no per-question data
    # the base model answered the same in both revisions: an interval of exactly 0
    assert cells["`base.test.rougeL` (higher is better)"][3] == "no clear change"
    # each revision's own fine-tuned minus base
    assert cells["`vs_base.test.rougeL` (higher is better)"] == [
        "+0.0000 [+0.0000, +0.0000]: no clear change", f"{vs_base['rougeL']['delta']:+.4f} {ci}: no clear change"]
    assert "| `tuned.test.rougeL` (higher is better) |" in result.stdout and "better" not in rouge[3]

    # `make exps` shows the values alone (here the untrained run in the workspace against the commit):
    # no verdict there to disagree with the other two
    from tools.smoke import dvc_environment

    shutil.copytree(repo, tmp_path / "ws", symlinks=True)
    _write_run(tmp_path / "ws", _five_questions([0.1, 0.3, 0.4, 0.2, 0.3], [2.0] * 5))
    table = subprocess.run([sys.executable, "-m", "tools.review", "--experiments"], cwd=tmp_path / "ws", text=True,
                           capture_output=True, env={**dvc_environment(), "COLUMNS": "200", "PYTHONPATH": str(ROOT)})
    assert table.returncode == 0, table.stderr
    assert "rougeL" in table.stdout and not re.search(r"better|worse|clear change", table.stdout), table.stdout
