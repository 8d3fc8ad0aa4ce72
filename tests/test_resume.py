"""Reruns that are right: an interrupted train resumes to exactly the uninterrupted result, and
nothing else ever resumes.

The interrupted runs are real processes (`python -m stages.train` as DVC starts it) stopped with
SIGINT or SIGKILL at a known point: after a checkpoint, and in the middle of writing one. The
test's own wrapper (never the stage code) holds the process at that point so the signal always
lands there.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import write_params
from stages import checkpoints, paths, prepare, train

RESUME_PARAMS = {"train.max_steps": 6, "train.save_steps": 2, "train.eval_steps": 3}

# Holds the train stage at a chosen point and touches a marker there, for the test to send its signal.
HOLD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from transformers import Trainer

    where, at, marker = os.environ["HOLD_WHERE"], int(os.environ["HOLD_AT"]), Path(os.environ["HOLD_MARKER"])

    def hold():
        marker.touch()
        time.sleep(300)

    if where == "step":  # in the optimizer step after checkpoint-<at>
        original_step = Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step >= at:
                hold()
            return original_step(self, *args, **kwargs)

        Trainer.training_step = training_step
    else:  # "save": checkpoint-<at>'s weights are on disk, its optimizer and trainer state not yet
        original_save = Trainer.save_model

        def save_model(self, output_dir=None, _internal_call=False):
            original_save(self, output_dir, _internal_call)
            if output_dir and output_dir.endswith(f"checkpoint-{at}"):
                hold()

        Trainer.save_model = save_model

    from stages import train
    train.main()
""")


def interrupted_run(workspace: Path, where: str, at: int, sig: int) -> subprocess.CompletedProcess:
    script, marker = workspace / ".hold.py", workspace / ".held"
    script.write_text(HOLD, encoding="utf-8")
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(workspace), "HOLD_WHERE": where, "HOLD_AT": str(at),
           "HOLD_MARKER": str(marker)}
    # As in a terminal, where Ctrl-C reaches a program with SIGINT's default action: a test runner
    # started in the background (`cmd &` in a script, as CI may be) passes SIGINT down as ignored.
    process = subprocess.Popen([sys.executable, str(script)], cwd=workspace, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached the hold point"
        time.sleep(0.2)
    process.send_signal(sig)
    try:  # generous: on a loaded 2-core CI machine the interpreter's shutdown alone can take a while
        stdout, stderr = process.communicate(timeout=360)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"the run did not stop within 6 minutes of signal {sig}:\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def curves() -> dict[str, list[tuple[int, float]]]:
    found = {}
    for tsv in sorted((paths.DVCLIVE_TRAIN_DIR / "plots/metrics").rglob("*.tsv")):
        with open(tsv, encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))[1:]
        found[str(tsv.relative_to(paths.DVCLIVE_TRAIN_DIR))] = [(int(step), float(value)) for step, value in rows]
    return found


def outputs() -> dict:
    """Everything the train stage writes that a resumed run must reproduce."""
    return {
        "adapter": {p.name: p.read_bytes() for p in sorted(paths.ADAPTER_DIR.iterdir())},
        "metrics": json.loads(paths.TRAIN_METRICS.read_text(encoding="utf-8")),
        "info": json.loads(paths.TRAIN_INFO.read_text(encoding="utf-8")),
        "curves": curves(),
    }


def assert_same_outputs(resumed: dict, reference: dict) -> None:
    assert resumed["adapter"].keys() == reference["adapter"].keys()
    for name, data in reference["adapter"].items():
        assert resumed["adapter"][name] == data, f"models/adapter/{name} differs"
    losses, expected = resumed["metrics"]["train"], reference["metrics"]["train"]
    assert losses.keys() == expected.keys()
    for key, value in expected.items():
        assert losses[key] == pytest.approx(value, abs=1e-6), key
    assert resumed["info"] == reference["info"]  # steps, epochs, tokens seen, batch, versions
    assert resumed["curves"].keys() == reference["curves"].keys()
    for name, points in reference["curves"].items():
        assert [s for s, _ in resumed["curves"][name]] == [s for s, _ in points], name
        assert [v for _, v in resumed["curves"][name]] == pytest.approx([v for _, v in points], abs=1e-6), name


@pytest.fixture(scope="module")
def reference(smoke_template, tmp_path_factory):
    """One uninterrupted run with the resume params: what every resumed run must equal."""
    import shutil

    dest = tmp_path_factory.mktemp("reference") / "ws"
    shutil.copytree(smoke_template, dest, symlinks=True)
    previous = os.getcwd()
    os.chdir(dest)
    try:
        write_params(dest, RESUME_PARAMS)
        prepare.main()
        train.main()
        result = outputs()
    finally:
        os.chdir(previous)
    assert [s for s, _ in result["curves"]["plots/metrics/train/loss.tsv"]] == list(range(1, 7))
    assert [s for s, _ in result["curves"]["plots/metrics/eval/loss.tsv"]] == [3, 6]
    return result


@pytest.mark.parametrize(
    "where, at, sig, resumes_from",
    [
        ("step", 2, signal.SIGINT, "checkpoint-2"),   # Ctrl-C in step 3, after checkpoint-2
        ("step", 4, signal.SIGKILL, "checkpoint-4"),  # kill -9 in step 5, after checkpoint-4
        ("save", 4, signal.SIGKILL, "checkpoint-2"),  # kill -9 while checkpoint-4 is being written
    ],
    ids=["sigint-after-checkpoint", "sigkill-after-checkpoint", "sigkill-while-saving"],
)
def test_a_resumed_run_writes_exactly_what_an_uninterrupted_run_writes(
        workspace, reference, caplog, where, at, sig, resumes_from):
    write_params(workspace, RESUME_PARAMS)
    prepare.main()
    stopped = interrupted_run(workspace, where, at, sig)
    if sig == signal.SIGINT:  # Ctrl-C: one line, exit 130, no traceback
        assert stopped.returncode == 130, stopped.stderr[-2000:]
        assert "Traceback" not in stopped.stderr
        said = [line for line in stopped.stderr.splitlines() if line.startswith("interrupted:")]
        assert len(said) == 1 and said[0].startswith("interrupted: no output was replaced"), stopped.stderr[-2000:]
    else:
        assert stopped.returncode == -signal.SIGKILL
    assert not paths.ADAPTER_DIR.exists() and not paths.TRAIN_METRICS.exists()
    assert (paths.CHECKPOINT_DIR / f"checkpoint-{at}").is_dir()

    with caplog.at_level("INFO", logger="stages.train"):
        train.main()
    assert f"resuming from models/checkpoints/{resumes_from}" in caplog.text
    if where == "save":
        assert f"skipping models/checkpoints/checkpoint-{at}: its save did not finish" in caplog.text
    assert_same_outputs(outputs(), reference)
    assert not paths.CHECKPOINT_DIR.exists()  # finished: nothing left to resume


def _trained_from_scratch(caplog) -> bool:
    """True when train.main() ran every step in this process (a resumed run logs no step 1)."""
    with caplog.at_level("INFO", logger="stages.train"):
        caplog.clear()
        train.main()
    steps = json.loads(paths.TRAIN_INFO.read_text(encoding="utf-8"))["steps"]
    return "resuming from" not in caplog.text and "step 1/6  loss" in caplog.text and steps == 6


def _leave_interrupted_checkpoints(monkeypatch):
    """Run until checkpoint-4 is complete, then stop as a crash would (in-process, cheap)."""
    from transformers import Trainer

    original = Trainer.training_step

    def crash_after_checkpoint_four(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", crash_after_checkpoint_four)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main()
    monkeypatch.setattr(Trainer, "training_step", original)
    assert checkpoints.last_complete_checkpoint().name == "checkpoint-4"


def _change_training_data(workspace):
    path = paths.split_file("train")
    rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(rows[:-1]), encoding="utf-8")  # one row fewer


@pytest.mark.parametrize(
    "change",
    [lambda ws: write_params(ws, {"train.learning_rate": 1.0e-2}), _change_training_data],
    ids=["train-param", "training-data"],
)
def test_an_interrupted_run_is_not_resumed_after_a_change(workspace, monkeypatch, caplog, change):
    write_params(workspace, RESUME_PARAMS)
    prepare.main()
    _leave_interrupted_checkpoints(monkeypatch)
    change(workspace)
    assert _trained_from_scratch(caplog)
    assert "not resuming models/checkpoints: params, data, code or libraries changed" in caplog.text


def test_the_fingerprint_covers_everything_that_decides_the_result(workspace, monkeypatch):
    from stages.params import load_params

    prepare.main()
    fingerprint = lambda: checkpoints.run_fingerprint(load_params())  # noqa: E731
    seen = {fingerprint()}
    for key, value in (("seed", 7), ("lora.r", 8), ("lora.target_modules", ["q_proj"]), ("model.max_seq_length", 384),
                       ("train.gradient_accumulation_steps", 1), ("train.max_steps", 7), ("train.optim", "sgd")):
        write_params(workspace, {key: value})
        seen.add(fingerprint())
    assert len(seen) == 8, "each change must give a new fingerprint"
    write_params(workspace, {"eval.max_new_tokens": 8, "merge.dtype": "bfloat16"})  # not train's business
    assert fingerprint() in seen
    for path in (paths.split_file("validation"), workspace / "stages/callbacks.py", workspace / "stages/prompt.py"):
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("\n")
        assert fingerprint() not in seen, path
        seen.add(fingerprint())
    monkeypatch.setattr(checkpoints, "library_versions", lambda: {"transformers": "0.0.0"})
    assert fingerprint() not in seen


def test_a_finished_run_leaves_nothing_to_resume(workspace, caplog):
    """A forced rerun (`dvc repro -f train`, or after `dvc exp apply`) trains from step 0."""
    write_params(workspace, RESUME_PARAMS)
    prepare.main()
    train.main()
    first = outputs()
    assert not paths.CHECKPOINT_DIR.exists()
    assert _trained_from_scratch(caplog)
    assert_same_outputs(outputs(), first)


@pytest.fixture(scope="module")
def interrupted(smoke_template, tmp_path_factory) -> Path:
    """A workspace whose train run crashed after checkpoint-4: checkpoint-2 and -4 complete, as the
    Trainer wrote them."""
    dest = tmp_path_factory.mktemp("interrupted") / "ws"
    shutil.copytree(smoke_template, dest, symlinks=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(dest)
        write_params(dest, RESUME_PARAMS)
        prepare.main()
        _leave_interrupted_checkpoints(patch)
    return dest


def _interrupted_copy(interrupted: Path, tmp_path: Path, monkeypatch) -> Path:
    dest = tmp_path / "ws"
    shutil.copytree(interrupted, dest, symlinks=True)
    monkeypatch.chdir(dest)
    return dest


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # what a kill or a full disk leaves of a file being written


RESUME_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


@pytest.mark.parametrize("name", RESUME_FILES)
def test_each_file_the_trainer_resumes_from_is_checked(interrupted, tmp_path, monkeypatch, name):
    _interrupted_copy(interrupted, tmp_path, monkeypatch)
    damaged, previous = paths.CHECKPOINT_DIR / "checkpoint-4", paths.CHECKPOINT_DIR / "checkpoint-2"
    assert checkpoints.unloadable(damaged) is None and checkpoints.unloadable(previous) is None
    _cut_short(damaged / name)
    assert checkpoints.unloadable(damaged).startswith(f"{name} does not load (")
    assert checkpoints.last_complete_checkpoint() == previous


@pytest.mark.parametrize("damaged, resumes_from", [
    (["checkpoint-4/adapter_model.safetensors"], "checkpoint-2"),  # the case: every rerun failed
    (["checkpoint-4/optimizer.pt", "checkpoint-2/trainer_state.json"], None),  # none loads: step 0
], ids=["previous-checkpoint", "from-step-zero"])
def test_a_damaged_checkpoint_never_blocks_the_rerun(interrupted, reference, tmp_path, monkeypatch, caplog,
                                                     damaged, resumes_from):
    _interrupted_copy(interrupted, tmp_path, monkeypatch)
    for name in damaged:
        _cut_short(paths.CHECKPOINT_DIR / name)
    with caplog.at_level("INFO", logger="stages.train"):
        train.main()
    skipped = [m for m in caplog.messages if m.startswith("skipping ")]
    instead = f"resuming from {resumes_from}" if resumes_from else \
        "no complete checkpoint left: training starts from step 0"
    assert len(skipped) == len(damaged)
    for message, name in zip(skipped, damaged):  # newest first, one line each
        folder, file = name.split("/")
        assert message.startswith(f"skipping models/checkpoints/{folder}: {file} does not load ("), message
        assert message.endswith(f"); removed it; {instead}"), message
    if resumes_from:
        assert f"resuming from models/checkpoints/{resumes_from}" in caplog.text
    else:
        assert "step 1/6  loss" in caplog.text and "resuming from models" not in caplog.text
    assert_same_outputs(outputs(), reference)
    assert not paths.CHECKPOINT_DIR.exists()
