"""Nothing lost: whatever stops a stage that `dvc repro` started, every output is afterwards
byte-identical to the committed result, or the complete new one, and a plain rerun recovers.

Each case runs `dvc repro` as a user does, in a copy of a committed workspace, after the param change
a user would make. The test's own sitecustomize (on PYTHONPATH, never the stage code) holds the
stage at a chosen point: in a training step, or with every new output written and none yet in place
(the worst moment to lose a week of GPU time). The signal then goes to the whole process group, as
a terminal's Ctrl-C or a batch scheduler's SIGTERM does.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import output_hashes, write_params
from tools.smoke import dvc_environment

ROOT = Path(__file__).resolve().parents[1]

HOLD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path

    def hold():
        Path(os.environ["HOLD_MARKER"]).touch()
        time.sleep(300)

    if f"stages.{os.environ.get('HOLD_STAGE')}" in sys.orig_argv:
        where = os.environ["HOLD_WHERE"]
        if where.startswith("fsize-"):  # no hold: `ulimit -f` for this stage alone (DVC's own index needs more)
            import resource
            limit = int(where.removeprefix("fsize-"))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        elif where.startswith("step-"):  # in the optimizer step after step-N
            from transformers import Trainer
            original_step, after = Trainer.training_step, int(where.removeprefix("step-"))

            def training_step(self, *args, **kwargs):
                if self.state.global_step >= after:
                    hold()
                return original_step(self, *args, **kwargs)

            Trainer.training_step = training_step
        else:
            from stages import outputs
            if where == "publish":  # every new output written, none in place yet
                original_publish = outputs.Staged.publish

                def publish(self):
                    hold()
                    original_publish(self)

                outputs.Staged.publish = publish
            else:  # "renamed": four new outputs in place, the others not yet
                original_replace, renamed = os.replace, []

                def replace(src, dst):
                    original_replace(src, dst)
                    renamed.append(dst)
                    if len(renamed) == 8:  # each output: its previous version aside, then the new one in
                        hold()

                outputs.os.replace = replace
""")


@pytest.fixture
def repo(committed_run, tmp_path):
    dest = tmp_path / "ws"
    shutil.copytree(committed_run, dest, symlinks=True)
    return dest


def git_status(repo: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=repo, check=True, capture_output=True,
                          text=True).stdout


def hooked(repo: Path, stage: str, where: str) -> dict:
    """The environment for a `dvc repro` whose `stage` the test's sitecustomize holds at `where`."""
    hooks = repo.parent / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOLD, encoding="utf-8")
    return {**dvc_environment(), "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}", "HOLD_STAGE": stage,
            "HOLD_WHERE": where, "HOLD_MARKER": str(repo.parent / "held")}


def stopped_repro(repo: Path, stage: str, where: str, sig: int, *args: str,
                  command: tuple[str, ...] = ("repro",)) -> subprocess.CompletedProcess:
    """`dvc repro ARGS` (or another dvc COMMAND), stopped by `sig` sent to its process group when
    `stage` reaches `where`."""
    env = hooked(repo, stage, where)
    marker = Path(env["HOLD_MARKER"])
    # A session of its own, as a terminal's foreground job; SIGINT's default action restored (a test
    # runner started in the background passes it down as ignored).
    process = subprocess.Popen([sys.executable, "-m", "dvc", *command, *args], cwd=repo, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{stage} never reached {where}:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.2)
    os.killpg(process.pid, sig)
    try:
        output, _ = process.communicate(timeout=300)  # until the stage, which holds the pipe too, has ended
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"dvc repro did not end within 5 minutes of signal {sig}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, output)


# (stage, the change a user made before `dvc repro <stage>`, where the stage is held)
CASES = [
    ("prepare", {"data.split_seed": 7}, "publish"),
    ("train", {"lora.r": 8}, "step-2"),
    ("merge", {"merge.dtype": "bfloat16"}, "publish"),
    ("evaluate_base", {"eval.max_new_tokens": 12}, "publish"),
    ("evaluate", {"eval.report_examples": 1}, "publish"),
    ("plots", {}, "publish"),  # forced: its one param, the decision options, would rerun both evaluations first
]
LINES = {signal.SIGINT: "interrupted: no output was replaced", signal.SIGTERM: "terminated (SIGTERM): no output was replaced"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("stage, change, where", CASES, ids=[case[0] for case in CASES])
def test_a_stopped_stage_leaves_every_output_as_it_was(repo, stage, change, where, sig):
    before = output_hashes(repo)
    assert None not in before.values()
    # Only the stage (validate, which runs first in a plain `dvc repro`, finishes in every case: the
    # tests below run it); DVC still deletes the stage's outputs first unless they persist.
    only = ("--single-item", *(["--force"] if not change else []), stage)
    if stage == "train" and sig == signal.SIGINT:  # as in `dvc exp run -S lora.r=8`, then Ctrl-C
        sets = [arg for key, value in change.items() for arg in ("-S", f"{key}={value}")]
        result = stopped_repro(repo, stage, where, sig, *sets, *only, command=("exp", "run"))
    else:
        write_params(repo, change)
        result = stopped_repro(repo, stage, where, sig, *only)
    assert result.returncode != 0
    said = [line for line in result.stdout.splitlines() if line.startswith(("interrupted", "terminated", "error"))]
    assert len(said) == 1 and said[0].startswith(LINES[sig]), result.stdout[-3000:]
    assert "Traceback" not in result.stdout
    assert output_hashes(repo) == before  # byte for byte, and dvc.lock
    # dvc exp run may put params.yaml back itself when the run fails, depending on when the signal lands
    allowed = {" M params.yaml\n"} | ({""} if sig == signal.SIGINT and stage == "train" else set()) if change else {""}
    assert git_status(repo) in allowed
    assert not list((repo / "models").glob(".publishing-*")) and not list(repo.rglob(".*.tmp-*"))


def rerun_until_recorded(repo: Path, stage: str) -> subprocess.CompletedProcess:
    """A plain `dvc repro STAGE`, which must succeed and leave the stage as dvc.lock now records it."""
    rerun = subprocess.run([sys.executable, "-m", "dvc", "repro", stage], cwd=repo, capture_output=True, text=True,
                           env=dvc_environment())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", stage], cwd=repo, capture_output=True,
                            text=True, env=dvc_environment())
    assert status.stdout.strip() == "{}"  # every output as the new dvc.lock records it
    return rerun


def test_a_kill_while_outputs_are_put_in_place_is_rolled_back_and_a_rerun_completes(repo):
    before = output_hashes(repo)
    write_params(repo, {"eval.report_examples": 1})
    result = stopped_repro(repo, "evaluate", "renamed", signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    mixed = output_hashes(repo)  # evaluate's report new (predictions and plot data are the same), its metrics old
    assert mixed["metrics/report.md"] != before["metrics/report.md"]
    assert mixed["metrics/eval.json"] == before["metrics/eval.json"] and mixed["dvc.lock"] == before["dvc.lock"]

    rerun = rerun_until_recorded(repo, "evaluate")
    assert "put every previous version back" in rerun.stderr
    after = output_hashes(repo)
    assert after["metrics/report.md"] != before["metrics/report.md"]  # the new result, whole
    assert {path for path in after if after[path] != before[path]} - {"dvc.lock"} <= {
        "metrics/report.md", "metrics/info/evaluate.json", "metrics/cost/evaluate.json"}


def test_sigterm_in_training_then_a_rerun_resumes_and_finishes(repo):
    write_params(repo, {"lora.r": 8})
    result = stopped_repro(repo, "train", "step-8", signal.SIGTERM)  # smoke params: a checkpoint every 8 steps
    assert result.returncode != 0 and "terminated (SIGTERM): no output was replaced" in result.stdout
    rerun = rerun_until_recorded(repo, "train")
    assert "resuming from models/checkpoints/checkpoint-8" in rerun.stderr


def test_a_full_disk_in_merge_is_one_line_and_leaves_every_output(repo):
    """`ulimit -f` (a batch system's file-size limit; the same errors as a full disk) below the size of
    the merged weights: merge fails while writing them, in one line, after DVC had started the stage."""
    before = output_hashes(repo)
    write_params(repo, {"merge.dtype": "bfloat16"})
    limit = (repo / "models/merged/model.safetensors").stat().st_size // 4  # the bfloat16 weights are half
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "merge"], cwd=repo, text=True,
                            capture_output=True, env=hooked(repo, "merge", f"fsize-{limit}"))
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith("error: cannot write models/merged (about "), result.stderr[-3000:]
    assert "a file grew past the largest size allowed" in said[0] and "Traceback" not in result.stderr
    assert output_hashes(repo) == before
    assert not list((repo / "models").glob(".*-*"))  # no temporary folder, no journal
