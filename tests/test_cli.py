"""Every entry point's command line: --help says what it reads, writes and accepts and runs nothing;
a wrong argument is one line and exit 2."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def entry_points() -> list[str]:
    """Every module under stages/ and tools/ with a main() and a __main__ block: what `python -m` runs."""
    found = []
    for file in sorted([*ROOT.glob("stages/*.py"), *ROOT.glob("tools/*.py")]):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        has_main = any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
        runs = any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)
        if has_main and runs:
            found.append(f"{file.parent.name}.{file.stem}")
    return found


def test_the_entry_points_are_found():
    assert {"stages.train", "stages.evaluate", "stages.plots", "stages.predict", "tools.review",
            "tools.smoke"} <= set(entry_points())


def _run(module: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    home = cwd.parent / "home"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(home),
           "XDG_CACHE_HOME": str(home / ".cache"), "MPLCONFIGDIR": str(home / "mpl"), "HF_HOME": str(home / "hf")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b""
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("module", entry_points())
def test_help_says_what_it_reads_writes_and_accepts_and_runs_nothing(module, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "home").mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, project / name)
    before = _tree(tmp_path)

    result = _run(module, project, "--help")
    assert result.returncode == 0, result.stderr
    assert _tree(tmp_path) == before  # nothing written: no output, no cache, no log file
    assert result.stdout.startswith(f"usage: python -m {module}")
    module_doc = ast.get_docstring(ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8")))
    assert module_doc.splitlines()[0] in result.stdout  # the docstring: the command, what it reads and writes
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    [stage] = [s for s in stages.values() if s["cmd"] == f"python -m {module}"] or [None]
    if stage is not None:  # and, for a DVC stage, what dvc.yaml gives it
        help_text = " ".join(result.stdout.split())
        for entry in [*stage["deps"], *stage.get("outs", []), *stage.get("metrics", [])]:
            name = next(iter(entry)) if isinstance(entry, dict) else entry
            assert name in help_text, (module, name)

    wrong = _run(module, project, "--no-such-flag")
    assert wrong.returncode == 2
    assert wrong.stdout == "" and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert wrong.stderr.startswith("error: ") and f"python -m {module} --help" in wrong.stderr
    assert _tree(tmp_path) == before
