"""The documents: every relative link and anchor resolves, and every command the README shows runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import no_environment_active

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The markdown outside fenced blocks and inline code: what GitHub renders as links and headings."""
    text = FENCE.sub("", text)
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text, flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but `-` and `_` dropped, spaces to `-`
    (letters of every script, Hangul included, kept)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", text, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path) -> list[str]:
    """Each relative link of a markdown file whose file, or whose #anchor in that file, is missing."""
    problems = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            problems.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: no heading #{anchor} in {linked.name}")
    return problems


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


def test_a_broken_anchor_or_file_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/guide.md").write_text(
        "# Guide\n\n## Several GPUs\n\n## Notes\n\n## Notes\n\n### 결과 읽기 (`make exps`)\n\n"
        "```sh\n# not a heading\n```\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    good = ["docs/guide.md", "docs/guide.md#several-gpus", "docs/guide.md#notes", "docs/guide.md#notes-1",
            "docs/guide.md#결과-읽기-make-exps", "#top", "https://example.org/#nothing-to-check"]
    bad = ["docs/guide.md#several-gpu", "docs/guide.md#notes-2", "docs/guide.md#not-a-heading",
           "docs/missing.md", "#offline-servers"]
    links = "\n".join(f"- [{target}]({target})" for target in good + bad)
    readme.write_text(f"# Top\n\n{links}\n\nIn code, `[not a link](#nowhere)` is not checked.\n", encoding="utf-8")
    assert [problem.split(":")[0] for problem in broken_links(readme)] == bad


# --- every command the README shows, run as written ---------------------------------------------

# Commands the README shows that this suite cannot run, each with its reason.
NOT_RUN_HERE = {
    "make repro": "needs a CUDA GPU and the Hugging Face Hub; `make smoke` runs the same pipeline on a CPU",
    "make test": "is this test suite",
}
ACTIVATE = "source ../.venv/bin/activate && "  # the README's "in an activated project", in ./smoke
PLOTS_DIR = Path("/tmp/plots-vs-main")


def readme_commands() -> list[str]:
    """The lines of the README's ```sh blocks and its inline `make ...` commands, without comments."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`(make [^`]+)`", FENCE.sub("", text))
    commands = (re.sub(r"\s+#\s.*$", "", line).strip() for line in lines)
    return list(dict.fromkeys(command for command in commands if command))


def _smoke_made(project: Path, output: str) -> None:
    smoke = project / "smoke"
    assert re.findall(r"Running stage '([a-z_]+)'", output) == [
        "validate", "prepare", "train", "merge", "evaluate_base", "evaluate", "plots"], output
    assert (smoke / "metrics/report.md").is_file(), output
    git = ["git", "-C", str(smoke)]
    assert subprocess.run([*git, "branch", "--show-current"], capture_output=True, text=True).stdout == "main\n"
    assert subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout == ""


def _experiment_ran(project: Path, output: str) -> None:
    assert re.findall(r"Running stage '([a-z_]+)'", output) == ["validate", "train", "merge", "evaluate", "plots"]
    assert "  r: 8 " in (project / "smoke/params.yaml").read_text(encoding="utf-8")


def _nothing_to_rerun(project: Path, output: str) -> None:
    assert "Running stage 'train'" not in output, output


def _experiment_table(project: Path, output: str) -> None:
    header = next(line for line in output.splitlines() if "Experiment" in line).split()
    assert "lora.r" in header and "train.loss" in header, output
    assert re.search(r"^\s*main\b.*\b16\b", output, flags=re.M), output  # the baseline: main, lora.r 16
    assert re.search(r"\b8\b", output), output


def _metrics_against_main(project: Path, output: str) -> None:
    assert re.search(r"^metrics/train\.json\s+train\.loss\s", output, flags=re.M), output
    assert re.search(r"^metrics/eval\.json\s+tuned\.test\.rougeL\s", output, flags=re.M), output


def _review_comment(project: Path, output: str) -> None:
    assert "| metric | main | this revision | change [95% interval] | verdict |" in output, output
    assert any(re.fullmatch(r"\|\s*params\.yaml\s*\|\s*lora\.r\s*\|\s*16\s*\|\s*8\s*\|", line)
               for line in output.splitlines()), output


def _plots_of_both(project: Path, output: str) -> None:
    drawn = PLOTS_DIR / "loss-per-optimizer-step.png"
    assert drawn.read_bytes().startswith(b"\x89PNG") and drawn.stat().st_mtime >= (project / "smoke/dvc.lock").stat().st_mtime, output


def _answered(project: Path, output: str) -> None:
    assert re.search(r"answering from models/merged: adapter [0-9a-f]{8} \(lora\.r=8, ", output), output


# In the README's order: make smoke in the project, then, in ./smoke with the environment activated,
# the commands of "Reading results" (the second `dvc exp run -S lora.r=8` finds nothing to rerun).
CHECKS = {
    "make smoke": ("", _smoke_made),
    "cd smoke && source ../.venv/bin/activate && dvc exp run -S lora.r=8": ("", _experiment_ran),
    "dvc exp run -S lora.r=8": ("smoke", _nothing_to_rerun),
    "make exps": ("smoke", _experiment_table),
    "dvc metrics diff main": ("smoke", _metrics_against_main),
    "make review BASE=main": ("smoke", _review_comment),
    "python -m stages.plots main -o /tmp/plots-vs-main": ("smoke", _plots_of_both),
    'python -m stages.predict "수술 전 빈혈은 고관절 골절 환자의 30일 사망률과 관련이 있는가?" --context "초록 첫 문단 ..."':
        ("smoke", _answered),
}


def test_every_command_the_readme_shows_runs_as_written_in_the_smoke_workspace(smoke_run, tmp_path):
    commands = readme_commands()
    assert set(commands) == set(CHECKS) | set(NOT_RUN_HERE), "a README command without a check here"
    ran_smoke, smoke_output = smoke_run  # `make smoke`, run once for the session (conftest)
    project = tmp_path / "project"
    shutil.copytree(ran_smoke, project, symlinks=True)
    env = no_environment_active()
    timings = []
    for command in (c for c in commands if c in CHECKS):
        where, check = CHECKS[command]
        if command == "make smoke":
            check(project, smoke_output)
            continue
        started = time.perf_counter()
        result = subprocess.run(["bash", "-c", (ACTIVATE if where else "") + command], cwd=project / where,
                                capture_output=True, text=True, env=env)
        timings.append(f"{time.perf_counter() - started:6.1f} s  {command}")
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"`{command}` failed:\n{output}"
        check(project, output)
    print("\n".join(timings))
