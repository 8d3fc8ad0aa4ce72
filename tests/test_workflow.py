"""The DVC workflow end to end, on the tiny model: repro, status, experiments, diffs."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tools.smoke import dvc_environment

STAGES = ["validate", "prepare", "train", "merge", "evaluate_base", "evaluate"]


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


@pytest.fixture(scope="module")
def repo(smoke_template, tmp_path_factory):
    import shutil

    dest = tmp_path_factory.mktemp("dvc") / "ws"
    shutil.copytree(smoke_template, dest, symlinks=True)
    output = dvc("repro", cwd=dest)
    assert ran(output) == STAGES
    git("add", "-A", cwd=dest)
    git("commit", "-qm", "baseline run", cwd=dest)
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
    output = dvc("repro", cwd=repo)
    assert ran(output) == []
    assert "didn't change" in output or "up to date" in output
    assert json.loads(dvc("status", "--json", cwd=repo)) == {}


def test_a_lora_change_marks_train_and_downstream_not_prepare(repo):
    params = (repo / "params.yaml").read_text(encoding="utf-8")
    try:
        (repo / "params.yaml").write_text(params.replace("  r: 16\n", "  r: 8\n"), encoding="utf-8")
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
    assert (repo / "metrics/data.json").read_bytes() == (pipeline_run / "metrics/data.json").read_bytes()
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
    assert ran(output) == ["validate", "train", "merge", "evaluate"]

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



RESULTS = ("data", "models/adapter", "models/merged", "metrics", "dvclive", "dvc.lock")


def snapshot(root) -> dict[str, bytes]:
    files = [p for name in RESULTS for p in ([root / name] if (root / name).is_file() else (root / name).rglob("*"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


def restore_baseline(repo):
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


def _status(repo) -> set[str]:
    return set(json.loads(dvc("status", "--json", cwd=repo)))


def test_switching_between_results_never_retrains(repo, tmp_path):
    """exp apply, git checkout + dvc checkout, and a teammate's clone + dvc pull: merge reruns
    (models/merged is not cached), train never does."""
    restore_baseline(repo)
    baseline = snapshot(repo)
    dvc("exp", "run", "-S", "lora.r=4", "-n", "rank-4", cwd=repo)
    experiment = snapshot(repo)
    assert experiment["models/adapter/adapter_model.safetensors"] != baseline["models/adapter/adapter_model.safetensors"]

    # back to the committed result: only the (uncached) merged model is stale
    restore_baseline(repo)
    assert "train" not in _status(repo) and "merge" in _status(repo)
    assert "train" not in ran(dvc("repro", cwd=repo))
    assert _status(repo) == set()

    # and to the experiment again
    dvc("exp", "apply", "rank-4", cwd=repo)
    assert "train" not in _status(repo) and "merge" in _status(repo)
    output = dvc("repro", cwd=repo)
    assert "train" not in ran(output) and "merge" in ran(output)
    assert snapshot(repo)["metrics/eval.json"] == experiment["metrics/eval.json"]

    # a teammate: clone, pull from a shared remote, reproduce
    restore_baseline(repo)
    dvc("repro", cwd=repo)
    dvc("remote", "add", "-d", "shared", str(tmp_path / "remote"), cwd=repo)
    dvc("push", cwd=repo)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    dvc("remote", "add", "-d", "shared", str(tmp_path / "remote"), cwd=clone)
    shutil.copytree(repo / "models/tiny-base", clone / "models/tiny-base")  # the base model is on disk
    dvc("pull", cwd=clone)
    assert "train" not in _status(clone) and "merge" in _status(clone)  # evaluate waits for merge
    output = dvc("repro", cwd=clone)
    assert "train" not in ran(output) and "merge" in ran(output)
    assert _status(clone) == set()
    assert (clone / "metrics/eval.json").read_bytes() == baseline["metrics/eval.json"]
    dvc("remote", "remove", "shared", cwd=repo)
