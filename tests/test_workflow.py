"""The DVC workflow end to end, on the tiny model: repro, status, experiments, diffs."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from tools.smoke import dvc_environment

STAGES = ["prepare", "train", "merge", "evaluate_base", "evaluate"]


def dvc(*args, cwd):
    # dvc.yaml's `python -m stages.<name>` must find this interpreter, activated venv or not.
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                            env=dvc_environment())
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


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
        assert changed == {"train"}  # merge and evaluate follow from train's new outputs
        assert "prepare" not in changed and "evaluate_base" not in changed
    finally:
        (repo / "params.yaml").write_text(params, encoding="utf-8")


def _without_timing(metrics: dict) -> dict:
    metrics = json.loads(json.dumps(metrics))
    metrics["generation"].pop("new_tokens_per_s")  # wall-clock speed: the only number that may move
    return metrics


def test_two_full_runs_give_identical_splits_adapters_and_metrics(repo, pipeline_run):
    # `repo` ran through `dvc repro` in subprocesses, `pipeline_run` in-process: same params.
    for split in ("train", "validation", "test"):
        path = f"data/prepared/{split}.jsonl"
        assert (repo / path).read_bytes() == (pipeline_run / path).read_bytes()
    assert (repo / "metrics/data.json").read_bytes() == (pipeline_run / "metrics/data.json").read_bytes()
    adapter = "models/adapter/adapter_model.safetensors"
    assert (repo / adapter).read_bytes() == (pipeline_run / adapter).read_bytes()
    for name in ("eval.json", "eval_base.json"):
        ours, theirs = (json.loads((root / "metrics" / name).read_text()) for root in (repo, pipeline_run))
        assert _without_timing(ours) == _without_timing(theirs)
    assert (repo / "metrics/predictions.jsonl").read_bytes() == (pipeline_run / "metrics/predictions.jsonl").read_bytes()


def test_an_experiment_reruns_only_what_depends_on_the_change(repo, tmp_path):
    output = dvc("exp", "run", "-S", "lora.r=8", cwd=repo)
    assert ran(output) == ["train", "merge", "evaluate"]

    shown = json.loads(dvc("exp", "show", "--json", cwd=repo))
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    assert experiments, shown
    params_r = {json.dumps(exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["lora"]["r"])
                for exp in experiments}
    assert params_r == {"8"}
    assert "eval.json" in json.dumps(experiments[0]["revs"][0]["data"]["metrics"])

    # The experiment's results are in the workspace: diff them against the baseline commit.
    params_diff = json.loads(dvc("params", "diff", "--json", cwd=repo))
    assert params_diff["params.yaml"]["lora.r"]["old"] == 16 and params_diff["params.yaml"]["lora.r"]["new"] == 8
    metrics_diff = json.loads(dvc("metrics", "diff", "--json", cwd=repo))
    assert "test.loss" in metrics_diff["metrics/eval.json"]
    assert "metrics/eval_base.json" not in metrics_diff  # the baseline was not rerun

    out_dir = tmp_path / "plots"
    dvc("plots", "diff", "HEAD", "-o", str(out_dir), cwd=repo)
    page = (out_dir / "index.html").read_text(encoding="utf-8")
    assert "HEAD" in page and "workspace" in page and "loss" in page

