"""The whole pipeline on a CPU in a few minutes: a tiny local model and the shipped Korean sample.

    make smoke        (or: python -m tools.smoke [--dir smoke])

    python -m tools.smoke --grid      (then also a queued grid: lora.r = 8 and 16)

It builds a throw-away copy of the project in ./smoke (its own git and DVC repository, params
overridden by SMOKE_PARAMS), builds a tiny Llama-shaped model there and tracks it with `dvc add`
(so queued experiments, which run in a fresh copy of the commit, have it too), and runs
`dvc repro`, then commits that result on its branch `main` as the baseline experiments compare
with, so the README's commands (`make exps`, `make review BASE=main`, `dvc metrics diff main`, ...)
work there as written. Its Makefile is the project's, on the environment that built the workspace
(no second install). With --grid it queues `dvc exp run --queue -S 'lora.r=range(8,17,8)'`, runs
the queue with `dvc exp run --run-all` and prints the experiment table. Your params.yaml, dvc.lock
and outputs are never touched. The tests use the same workspace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from stages import cli
from stages.errors import setup_logging

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "tools", "data/sample", ".dvcignore", "Makefile")
# Outside the git-ignored models/ folder, tracked by tiny-base.dvc: a queued experiment starts from
# a clean copy of the commit and gets the model from the DVC cache, as it gets every other input.
TINY_MODEL = "tiny-base"

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


GRID = "lora.r=range(8,17,8)"


def set_key(params: dict, dotted: str, value) -> None:
    *sections, key = dotted.split(".")
    for section in sections:
        params = params.setdefault(section, {})
    params[key] = value


def write_params(path: Path, overrides: dict) -> None:
    """Set dotted keys in a params file the way `dvc exp run -S` does: comments and layout kept."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(path) as params:
        for key, value in overrides.items():
            set_key(params, key, value)


def dvc_environment() -> dict:
    """This process's environment with its interpreter first on PATH, for dvc.yaml's `python -m ...`."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, check=True, text=True, capture_output=True)


def use_this_environment(makefile: Path) -> None:
    """The workspace's Makefile runs on this interpreter's environment: `make exps` and `make review`
    there must not build a second .venv inside the workspace (SETUP is the targets' install step)."""
    header = ("# The smoke workspace's copy (tools/smoke.py): the environment that built it, installed already.\n"
              f"VENV := {sys.prefix}\nSETUP :=\n\n")
    makefile.write_text(header + makefile.read_text(encoding="utf-8"), encoding="utf-8")


def make_workspace(dest: Path, overrides: dict | None = None, family: str = "llama") -> Path:
    """A fresh git + DVC repository at dest: the project's code, the sample, smoke params, a tiny model
    of `family` (tools/tiny_model.py)."""
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
    write_params(dest / "params.yaml", {**SMOKE_PARAMS, **(overrides or {})})
    use_this_environment(dest / "Makefile")
    (dest / ".gitignore").write_text("/models/\n/data/prepared\n/dvc_plots/\n", encoding="utf-8")
    build_tiny_model(dest / TINY_MODEL, dest / "data/sample/pubmedqa_ko_sample.json", family=family)
    run(["git", "init", "-q", "--initial-branch", "main"], dest)  # the README's `main`
    run(["git", "config", "user.email", "smoke@localhost"], dest)
    run(["git", "config", "user.name", "smoke"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    run([sys.executable, "-m", "dvc", "add", "-q", TINY_MODEL], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-q", "-m", "smoke workspace"], dest)
    return dest


def dvc(workspace: Path, *args: str) -> None:
    """A dvc command in the workspace, its output shown; a failure stops the smoke run."""
    print(f"\n$ dvc {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, env=dvc_environment())
    if result.returncode != 0:
        raise SystemExit(f"smoke run failed in `dvc {' '.join(args)}`: see the output above "
                         f"(workspace kept in {workspace})")


def commit_baseline(workspace: Path) -> None:
    """Commit the run's dvc.lock and metrics, as the README asks after a first real run, so
    experiments (`dvc exp show`, `dvc metrics diff`) compare against it."""
    run(["git", "add", "-A"], workspace)
    run(["git", "commit", "-q", "-m", "smoke baseline run"], workspace)


def run_grid(workspace: Path) -> None:
    """Queue and run a grid of experiments on the committed baseline, as the README shows."""
    dvc(workspace, "exp", "run", "--queue", "-S", GRID)
    dvc(workspace, "exp", "run", "--run-all")
    subprocess.run([sys.executable, "-m", "tools.review", "--experiments"], cwd=workspace, env=dvc_environment())


def main() -> None:
    parser = cli.parser(__spec__.name, __doc__)
    parser.add_argument("--dir", type=Path, default=Path("smoke"), help="workspace to (re)create")
    parser.add_argument("--grid", action="store_true", help=f"then queue and run the grid {GRID}")
    args = parser.parse_args()
    setup_logging()  # as every stage: `make smoke > log` gets no progress bars (the tiny model's, DVC's)
    started = time.perf_counter()
    workspace = make_workspace(args.dir)
    print(f"smoke workspace: {workspace} (tiny model, {len(SMOKE_PARAMS)} params overridden)", flush=True)
    dvc(workspace, "repro")
    metrics = json.loads((workspace / "metrics/eval.json").read_text(encoding="utf-8"))
    print(f"\nsmoke run done in {time.perf_counter() - started:.0f}s. Test metrics of the tiny model:")
    print(json.dumps(metrics["tuned"]["test"], indent=2, ensure_ascii=False))
    print(f"Report: {workspace}/metrics/report.md, plots: {workspace}/metrics/plots/")
    commit_baseline(workspace)
    print(f"Committed on main as the baseline; try an experiment: cd {workspace} && "
          f"source {sys.prefix}/bin/activate && dvc exp run -S lora.r=8 && make exps")
    if args.grid:
        run_grid(workspace)


if __name__ == "__main__":
    main()
