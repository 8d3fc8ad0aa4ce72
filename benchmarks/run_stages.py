"""Run pipeline stages in a scratch workspace with overridden params, timing each one.

    python -m benchmarks.run_stages WORKSPACE --stages prepare train merge \
        --set model.name=/tmp/llama8b model.backend=unsloth ... [--results results.json]

For GPU hosts without DVC's command line: it runs each `python -m stages.<name>` exactly as
dvc.yaml does (same modules, same params.yaml layout), in dvc.yaml's order, and records the wall
time of each, the params used and the metrics files the stages wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tools.smoke import ROOT, set_key


def parse_value(text: str):
    return yaml.safe_load(text)  # the same typing rules as params.yaml itself


def prepare_workspace(workspace: Path, overrides: dict) -> None:
    workspace.mkdir(parents=True, exist_ok=True)
    if not (workspace / "data/sample").exists():
        shutil.copytree(ROOT / "data/sample", workspace / "data/sample")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in overrides.items():
        set_key(params, key, value)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False),
                                           encoding="utf-8")


def stage_env() -> dict[str, str]:
    """This environment, with this checkout's stages importable from a scratch workspace."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_stages(workspace: Path, stages: list[str], log_file: Path | None = None) -> dict[str, float]:
    """Each stage's wall seconds; with log_file its output (every process's) goes there, not to the terminal."""
    env = stage_env()
    seconds = {}
    for stage in stages:
        started = time.perf_counter()
        print(f"== {stage}", flush=True)
        with open(log_file, "ab") if log_file else open(os.devnull, "rb") as sink:
            out = {"stdout": sink, "stderr": subprocess.STDOUT} if log_file else {}
            result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=workspace, env=env, **out)
        seconds[stage] = round(time.perf_counter() - started, 1)
        print(f"== {stage}: exit {result.returncode} after {seconds[stage]}s", flush=True)
        if result.returncode != 0:
            if log_file:
                print("\n".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]))
            raise SystemExit(f"stage {stage} failed")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--stages", nargs="+", required=True)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    overrides = {key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)}
    prepare_workspace(args.workspace, overrides)
    seconds = run_stages(args.workspace, args.stages)
    metrics = {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted((args.workspace / "metrics").glob("*.json"))
    }
    results = {"overrides": overrides, "stage_seconds": seconds, "total_seconds": round(sum(seconds.values()), 1),
               "metrics": metrics}
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({"stage_seconds": seconds, "total_seconds": results["total_seconds"]}))


if __name__ == "__main__":
    main()
