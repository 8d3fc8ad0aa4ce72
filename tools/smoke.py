"""The whole pipeline on a CPU in a few minutes: a tiny local model and the shipped Korean sample.

    make smoke        (or: python -m tools.smoke [--dir smoke])

It builds a throw-away copy of the project in ./smoke (its own git and DVC repository, params
overridden by SMOKE_PARAMS), builds a tiny Llama-shaped model there, and runs `dvc repro`. Your
params.yaml, dvc.lock and outputs are never touched. The tests use the same workspace.
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

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "tools", "data/sample", ".dvcignore")
TINY_MODEL = "models/tiny-base"

# Small, fast settings; the meaning of every stage stays the same.
SMOKE_PARAMS = {
    "data.source": "data/sample/pubmedqa_ko_sample.json",
    "model.name": TINY_MODEL,
    "model.base_16bit": TINY_MODEL,
    "model.load_in_4bit": False,
    "model.max_seq_length": 512,
    "model.backend": "transformers",
    # A tiny random model learns slowly: a high rate and 24 steps show the loss falling.
    "train.max_steps": 24,
    "train.warmup_steps": 2,
    "train.learning_rate": 2.0e-2,
    "train.per_device_train_batch_size": 2,
    "train.gradient_accumulation_steps": 2,
    "train.eval_steps": 8,
    "train.save_steps": 8,
    "merge.dtype": "float32",
    "eval.batch_size": 8,
    "eval.max_new_tokens": 24,
    "eval.report_examples": 2,
}


def set_key(params: dict, dotted: str, value) -> None:
    *sections, key = dotted.split(".")
    for section in sections:
        params = params.setdefault(section, {})
    params[key] = value


def dvc_environment() -> dict:
    """This process's environment with its interpreter first on PATH, for dvc.yaml's `python -m ...`."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, check=True, text=True, capture_output=True)


def make_workspace(dest: Path, overrides: dict | None = None) -> Path:
    """A fresh git + DVC repository at dest: the project's code, the sample, smoke params, tiny model."""
    from tools.tiny_model import build_tiny_model

    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text(encoding="utf-8"))
    for key, value in {**SMOKE_PARAMS, **(overrides or {})}.items():
        set_key(params, key, value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    (dest / ".gitignore").write_text("/models/\n/data/prepared\n/dvclive\n", encoding="utf-8")
    build_tiny_model(dest / TINY_MODEL, dest / "data/sample/pubmedqa_ko_sample.json")
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "smoke@localhost"], dest)
    run(["git", "config", "user.name", "smoke"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "smoke workspace"], dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("smoke"), help="workspace to (re)create")
    args = parser.parse_args()
    started = time.perf_counter()
    workspace = make_workspace(args.dir)
    print(f"smoke workspace: {workspace} (tiny model, {len(SMOKE_PARAMS)} params overridden)", flush=True)
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=workspace, env=dvc_environment())
    if result.returncode != 0:
        raise SystemExit(f"smoke run failed: see the output above (workspace kept in {workspace})")
    metrics = json.loads((workspace / "metrics/eval.json").read_text(encoding="utf-8"))
    print(f"\nsmoke run done in {time.perf_counter() - started:.0f}s. Test metrics of the tiny model:")
    print(json.dumps(metrics["tuned"]["test"], indent=2, ensure_ascii=False))
    print(f"Report: {workspace}/metrics/report.md")


if __name__ == "__main__":
    main()
