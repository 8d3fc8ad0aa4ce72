"""The DVC workflow end to end, on the tiny model: repro, status, experiments, diffs."""

import json
import re
import shutil
import subprocess
import sys
import time

from pathlib import Path

import pytest
import yaml

from stages.headline import HEADLINE
from tools.smoke import GRID, dvc_environment

ROOT = Path(__file__).resolve().parents[1]

STAGES = ["validate", "prepare", "train", "merge", "evaluate_base", "evaluate", "plots"]


def dvc(*args, cwd, ok=True):
    # dvc.yaml's `python -m stages.<name>` must find this interpreter, activated venv or not.
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                            env=dvc_environment())
    if ok:
        assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr
    return result


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def git_out(*args, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def experiment_table(repo) -> str:
    """`make exps`, as a 120-column terminal shows it."""
    result = subprocess.run([sys.executable, "-m", "tools.review", "--experiments"], cwd=repo, text=True,
                            capture_output=True, env={**dvc_environment(), "COLUMNS": "120", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return result.stdout


def predict(repo, *args):
    return subprocess.run([sys.executable, "-m", "stages.predict", "수술 전 빈혈은 사망률과 관련이 있는가?",
                           "--max-new-tokens", "4", *args], cwd=repo, capture_output=True, text=True,
                          env=dvc_environment())


@pytest.fixture(scope="module")
def repo(smoke_run, tmp_path_factory):
    """A copy of the smoke workspace: `make smoke` ran every stage there and committed the run on main."""
    project, output = smoke_run
    assert ran(output) == STAGES
    dest = tmp_path_factory.mktemp("dvc") / "ws"
    shutil.copytree(project / "smoke", dest, symlinks=True)
    (dest.parent / "repro.log").write_text(output, encoding="utf-8")  # what `make smoke > log 2>&1` keeps
    assert git_out("status", "--porcelain", cwd=dest) == ""
    return dest


def _paths(entries) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]


def test_repro_writes_every_output_and_a_second_repro_does_nothing(repo):
    declared = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    assert set(lock) == set(declared)
    for name, stage in declared.items():
        outputs = sorted(_paths(stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])))
        recorded = {out["path"]: out for out in lock[name]["outs"]}
        assert sorted(recorded) == outputs, name
        for path in outputs:  # written, hashed in dvc.lock; `dvc status` below says each still matches
            assert recorded[path]["md5"] and recorded[path]["size"] > 0, path
    assert (repo / "metrics/plots/loss-per-optimizer-step.png").stat().st_size > 0
    assert not (repo / "dvclive/train/metrics.json").exists()  # DVCLive's summary repeats metrics/train.json
    # the declared metrics are numbers to compare: counters, versions and hashes are plain outputs
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo))
    assert "metrics/info/" not in json.dumps(shown) and "versions" not in json.dumps(shown)
    output = dvc("repro", cwd=repo)
    assert ran(output) == []
    assert "didn't change" in output or "up to date" in output
    assert json.loads(dvc("status", "--json", cwd=repo)) == {}


def test_a_lora_change_marks_train_and_downstream_not_prepare(repo):
    params = (repo / "params.yaml").read_text(encoding="utf-8")
    try:
        edited = params.replace("  r: 16 ", "  r: 8  ")  # the line keeps its comment
        assert edited != params
        (repo / "params.yaml").write_text(edited, encoding="utf-8")
        changed = set(json.loads(dvc("status", "--json", cwd=repo)))
        assert changed == {"validate", "train"}  # merge and evaluate follow from train's new outputs
        assert "prepare" not in changed and "evaluate_base" not in changed
    finally:
        (repo / "params.yaml").write_text(params, encoding="utf-8")


def test_two_full_runs_give_identical_splits_adapters_and_metrics(repo, pipeline_run):
    # `repo` ran through `dvc repro` in subprocesses, `pipeline_run` in-process: same params.
    for split in ("train", "validation", "test"):
        path = f"data/prepared/{split}.jsonl"
        assert (repo / path).read_bytes() == (pipeline_run / path).read_bytes()
    assert (repo / "metrics/info/prepare.json").read_bytes() == (pipeline_run / "metrics/info/prepare.json").read_bytes()
    # the whole adapter folder, byte for byte: separate processes (other hash seeds) write the same
    # adapter_config.json, so its DVC hash does not change and merge does not rerun for nothing
    adapter = sorted(p.name for p in (repo / "models/adapter").iterdir())
    assert adapter == sorted(p.name for p in (pipeline_run / "models/adapter").iterdir())
    for name in adapter:
        assert (repo / "models/adapter" / name).read_bytes() == (pipeline_run / "models/adapter" / name).read_bytes(), name
    # Quality metrics hold no timing (that is in metrics/cost/): byte-identical between runs.
    for name in ("eval.json", "eval_base.json", "info/evaluate.json", "eval_plots/decisions.json"):
        assert (repo / "metrics" / name).read_bytes() == (pipeline_run / "metrics" / name).read_bytes(), name
    assert (repo / "metrics/predictions.jsonl").read_bytes() == (pipeline_run / "metrics/predictions.jsonl").read_bytes()


def test_an_experiment_reruns_only_what_depends_on_the_change(repo, tmp_path):
    output = dvc("exp", "run", "-S", "lora.r=8", cwd=repo)
    assert ran(output) == ["validate", "train", "merge", "evaluate", "plots"]
    # params.yaml is in DVC's own form: the experiment changes one line of it, comments kept
    changed = [line for line in git_out("diff", "-U0", "params.yaml", cwd=repo).splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["-  r: 16                    # adapter rank", "+  r: 8                     # adapter rank"]

    # the experiment table fits 120 columns: the changed param and the headline metrics, untruncated
    table = experiment_table(repo)
    header = next(line for line in table.splitlines() if "Experiment" in line).split()
    assert "lora.r" in header and "train.loss" in header, table
    # --only-changed: every headline column whose value the experiment changed (the tiny model's
    # decisions may all stay "yes"), and no other metric
    changed = {key for keys in json.loads(dvc("metrics", "diff", "--json", cwd=repo)).values() for key in keys}
    assert {m.key for m in HEADLINE if m.in_table and m.key in changed} == set(header) - {"Experiment", "lora.r"}
    assert "…" not in table and max(len(line) for line in table.splitlines()) <= 120
    assert dvc("exp", "show", "--no-pager", "--sort-by", "train.loss", "--csv", cwd=repo)  # unique names

    shown = json.loads(dvc("exp", "show", "--json", cwd=repo))
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    assert experiments, shown
    params_r = {json.dumps(exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["lora"]["r"])
                for exp in experiments}
    assert params_r == {"8"}
    assert "eval.json" in json.dumps(experiments[0]["revs"][0]["data"]["metrics"])
    # DVC rewrote params.yaml, unquoting eval.decision_options' yes / no keys: still the labels.
    assert "accuracy" in json.loads((repo / "metrics/eval.json").read_text(encoding="utf-8"))["tuned"]["test"]
    report = (repo / "metrics/report.md").read_text(encoding="utf-8")
    assert "**Params changed from the commit:** `lora.r` 16 \u2192 8\n" in report
    assert re.search(r"\*\*Run:\*\* experiment `[\w-]+` on commit `[0-9a-f]{7}`", report)

    # The experiment's results are in the workspace: diff them against the baseline commit.
    params_diff = json.loads(dvc("params", "diff", "--json", cwd=repo))
    assert params_diff["params.yaml"]["lora.r"]["old"] == 16 and params_diff["params.yaml"]["lora.r"]["new"] == 8
    metrics_diff = json.loads(dvc("metrics", "diff", "--json", cwd=repo))
    assert "tuned.test.loss" in metrics_diff["metrics/eval.json"]
    assert "vs_base.test.rougeL.delta" in metrics_diff["metrics/eval.json"]
    assert "metrics/eval_base.json" not in metrics_diff  # the baseline was not rerun

    out_dir = tmp_path / "plots"
    dvc("plots", "diff", "HEAD", "-o", str(out_dir), cwd=repo)
    page = (out_dir / "index.html").read_text(encoding="utf-8")
    assert "HEAD" in page and "workspace" in page and "loss" in page
    assert "Decisions of the fine-tuned model" in page and "ROUGE-L per test question" in page


def test_plots_show_renders_the_decision_matrices_and_the_rouge_scatter(repo):
    shown = json.loads(dvc("plots", "show", "--json", cwd=repo))["data"]
    decisions = json.loads((repo / "metrics/eval_plots/decisions.json").read_text(encoding="utf-8"))
    for title, field in (("Decisions of the base model", "base"), ("Decisions of the fine-tuned model", "fine_tuned")):
        [plot] = shown[title]
        spec = plot["content"]["spec"]
        assert spec["encoding"]["x"]["field"] == "reference" and spec["encoding"]["y"]["field"] == field
        values = plot["content"]["data"]["values"]
        assert [(v["reference"], v[field]) for v in values] == [(d["reference"], d[field]) for d in decisions]
    [scatter] = shown["ROUGE-L per test question, base (x) vs fine-tuned (y)"]
    assert len(scatter["content"]["data"]["values"]) == 5



def test_a_run_logged_to_a_file_has_one_record_per_line(repo):
    log = (repo.parent / "repro.log").read_text(encoding="utf-8")
    # no progress bar (the Trainer's, datasets', evaluation's) redrawn with carriage returns
    assert "\r" not in log and not re.search(r"\d+%\|", log), log[-3000:]
    # each stage's records, each on a line of its own
    assert re.search(r"^\d\d:\d\d:\d\d INFO stages\.train: step 1/\d+  loss", log, re.M), log[-3000:]
    assert re.search(r"^\d\d:\d\d:\d\d INFO stages\.evaluate: wrote metrics/eval\.json", log, re.M), log[-3000:]


def test_the_html_of_dvc_plots_show_is_not_a_change_to_commit(repo):
    dvc("plots", "show", cwd=repo)
    try:
        assert (repo / "dvc_plots/index.html").is_file()
        assert git_out("status", "--porcelain", "--", "dvc_plots", cwd=repo) == ""  # in the smoke workspace
        assert subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT).returncode == 0
    finally:
        shutil.rmtree(repo / "dvc_plots", ignore_errors=True)


RESULTS = ("data", "models/adapter", "models/merged", "metrics", "dvclive", "dvc.lock")


def snapshot(root) -> dict[str, bytes]:
    files = [p for name in RESULTS for p in ([root / name] if (root / name).is_file() else (root / name).rglob("*"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


def restore_baseline(repo):
    # An empty index first: `-S data.source=data/missing.json` keeps the line's length (the comment
    # column moves), and a same-size edit within the index's timestamp second can look unchanged to git.
    git("rm", "-r", "-q", "--cached", ".", cwd=repo)
    git("reset", "-q", "--hard", cwd=repo)
    dvc("checkout", "--force", cwd=repo)


@pytest.mark.parametrize(
    "setting, message",
    [("lora.r=abc", "error: params.yaml: lora.r = 'abc'"),
     ("data.source=data/missing.json", "error: data.source = data/missing.json: no such file or folder")],
)
def test_a_failed_run_leaves_every_earlier_result_in_place(repo, setting, message):
    restore_baseline(repo)
    before = snapshot(repo)
    assert "models/adapter/adapter_model.safetensors" in before and "metrics/eval.json" in before
    result = dvc("exp", "run", "-S", setting, cwd=repo, ok=False)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert ran(result.stdout + result.stderr) == ["validate"]
    assert snapshot(repo) == before  # byte for byte
    restore_baseline(repo)


def test_a_bit_identical_rerun_leaves_git_and_the_metrics_diff_clean(repo):
    """Timings differ on every run; the cost file keeps the measurement of the locked result when a
    rerun reproduces it, so nothing else in git changes either."""
    restore_baseline(repo)
    dvc("repro", cwd=repo)  # the merged model, left stale by the experiment before
    assert git_out("status", "--porcelain", cwd=repo) == ""
    costs = {name: (repo / "metrics/cost" / name).read_bytes() for name in ("train.json", "evaluate_base.json")}
    output = dvc("repro", "-f", "train", "evaluate_base", cwd=repo)
    assert {"train", "evaluate_base"} <= set(ran(output))
    assert git_out("status", "--porcelain", cwd=repo) == ""  # dvc.lock, metrics, curves, cost: all the same
    for name, cost in costs.items():
        assert (repo / "metrics/cost" / name).read_bytes() == cost, name
    assert json.loads(dvc("metrics", "diff", "--json", cwd=repo)) == {}
    assert _status(repo) == set()


def test_a_queued_grid_runs_each_experiment_in_a_clean_copy(repo):
    """`dvc exp run --queue -S 'lora.r=range(8,17,8)'` + `dvc queue start`: each experiment starts from
    a copy of the commit, so everything it reads must be in git or DVC (the base model is `dvc add`ed)."""
    restore_baseline(repo)
    queued = dvc("exp", "run", "--queue", "-S", GRID, cwd=repo)
    names = re.findall(r"Queued experiment '([^']+)'", queued)
    assert len(names) == 2, queued
    dvc("queue", "start", cwd=repo)
    deadline = time.monotonic() + 900
    while re.search(r"\b(Queued|Running)\b", dvc("queue", "status", cwd=repo)):
        assert time.monotonic() < deadline, dvc("queue", "status", cwd=repo)
        time.sleep(3)
    dvc("queue", "stop", cwd=repo)  # no worker left behind
    status = dvc("queue", "status", cwd=repo)
    assert all(re.search(rf"{name}.*Success", status) for name in names), status

    shown = json.loads(dvc("exp", "show", "--json", cwd=repo))
    runs = {exp["name"]: exp["revs"][0]["data"] for commit in shown for exp in (commit.get("experiments") or [])}
    assert sorted(runs[name]["params"]["params.yaml"]["data"]["lora"]["r"] for name in names) == [8, 16]
    losses = {runs[name]["metrics"]["metrics/train.json"]["data"]["train"]["loss"] for name in names}
    assert len(losses) == 2  # two ranks really trained


def _status(repo) -> set[str]:
    return set(json.loads(dvc("status", "--json", cwd=repo)))


def test_switching_between_results_never_retrains(repo, tmp_path):
    """exp apply, git checkout + dvc checkout, and a teammate's clone + dvc pull: merge reruns
    (models/merged is not cached), train never does."""
    restore_baseline(repo)
    # the team's remotes (docs/review.md, "Working as a team"), set and committed before the experiments:
    # `dvc exp push` reads the DVC remote from the experiment's own commit
    git("init", "-q", "--bare", str(tmp_path / "team.git"), cwd=tmp_path)
    git("remote", "add", "origin", str(tmp_path / "team.git"), cwd=repo)
    dvc("remote", "add", "-d", "shared", str(tmp_path / "dvc-remote"), cwd=repo)
    git("commit", "-qm", "shared DVC remote", ".dvc/config", cwd=repo)
    baseline = snapshot(repo)
    dvc("exp", "run", "-S", "lora.r=4", "-n", "rank-4", cwd=repo)
    experiment = snapshot(repo)
    assert experiment["models/adapter/adapter_model.safetensors"] != baseline["models/adapter/adapter_model.safetensors"]

    # back to the committed result: only the (uncached) merged model is stale, and predict says so
    restore_baseline(repo)
    assert "train" not in _status(repo) and "merge" in _status(repo)
    refused = predict(repo)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        "error: models/merged does not match dvc.lock (results were switched, or params changed since); "
        "run `dvc repro merge` first"]
    assert "train" not in ran(dvc("repro", cwd=repo))
    assert _status(repo) == set()
    answered = predict(repo)
    assert answered.returncode == 0, answered.stderr  # (the tiny model's four tokens may be blank)
    adapter = _locked_out(repo, "train", "models/adapter")[:8]
    assert (f"answering from models/merged: adapter {adapter} (lora.r=16, lora.alpha=16, train.learning_rate=0.02, "
            "train.max_steps=24, seed=3407) merged into tiny-base, as dvc.lock records it") in answered.stderr

    # and to the experiment again
    dvc("exp", "apply", "rank-4", cwd=repo)
    assert "train" not in _status(repo) and "merge" in _status(repo)
    output = dvc("repro", cwd=repo)
    assert "train" not in ran(output) and "merge" in ran(output)
    assert snapshot(repo)["metrics/eval.json"] == experiment["metrics/eval.json"]

    # a teammate (docs/review.md, "Working as a team"): the result and the experiment go through a git remote
    # and a DVC remote; a clone + dvc pull gets the adapter, metrics and base model, and merge rebuilds
    # models/merged, never train
    restore_baseline(repo)
    dvc("repro", cwd=repo)
    branch = git_out("rev-parse", "--abbrev-ref", "HEAD", cwd=repo).strip()
    git("push", "-q", "origin", branch, cwd=repo)
    dvc("push", cwd=repo)
    dvc("exp", "push", "origin", "rank-4", cwd=repo)

    clone = tmp_path / "clone"
    git("clone", "-q", "-b", branch, str(tmp_path / "team.git"), str(clone), cwd=tmp_path)
    dvc("pull", cwd=clone)
    assert (clone / "tiny-base/config.json").exists() and (clone / "models/adapter/adapter_config.json").exists()
    assert "train" not in _status(clone) and "merge" in _status(clone)  # evaluate waits for merge
    output = dvc("repro", cwd=clone)
    assert "train" not in ran(output) and "merge" in ran(output)
    assert _status(clone) == set()
    assert (clone / "metrics/eval.json").read_bytes() == baseline["metrics/eval.json"]

    dvc("exp", "pull", "origin", "rank-4", cwd=clone)
    dvc("exp", "apply", "rank-4", cwd=clone)
    output = dvc("repro", cwd=clone)
    assert "train" not in ran(output) and "merge" in ran(output)
    assert (clone / "metrics/eval.json").read_bytes() == experiment["metrics/eval.json"]
    assert "(lora.r=4, " in predict(clone).stderr


def _locked_out(repo, stage: str, path: str) -> str:
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    return next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)
