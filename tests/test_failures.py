"""Failures no param check can see coming: out of GPU memory, a full disk, DVC's lock held by
another command. Each ends a stage in one `error:` line and exit 2, never a traceback, and leaves
its outputs as they were."""

import errno
import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stages import dvclock, evaluate, evaluate_base, merge, predict
from stages.errors import UserError, as_user_error, writing

OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"


def _workspace(pipeline_run: Path, tmp_path: Path, monkeypatch) -> Path:
    dest = tmp_path / "ws"
    shutil.copytree(pipeline_run, dest, symlinks=True)
    monkeypatch.chdir(dest)
    return dest


def _outputs(workspace: Path) -> dict[str, str]:
    """Every file under models/ and metrics/, by content hash."""
    return {str(p.relative_to(workspace)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("models", "metrics") for p in sorted((workspace / folder).rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(said) == 1, err[-3000:]
    return said[0]


def _raise_out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError(OUT_OF_MEMORY)


def _forward_runs_out(monkeypatch):
    from transformers import LlamaModel  # the decoder stack: scoring and the answer loop both run it

    monkeypatch.setattr(LlamaModel, "forward", _raise_out_of_memory)


def _merge_runs_out(monkeypatch):
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", _raise_out_of_memory)


def _loading_runs_out(monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _raise_out_of_memory)


@pytest.mark.parametrize("run, runs_out, expected", [
    (evaluate_base.main, _forward_runs_out,
     "error: out of GPU memory evaluating at eval.batch_size = 8 and eval.max_new_tokens = 24: try "
     "-S eval.batch_size=4, or a smaller -S eval.max_new_tokens"),
    (evaluate.main, _forward_runs_out, "error: out of GPU memory evaluating at eval.batch_size = 8 and "),
    (merge.main, _merge_runs_out, "error: out of GPU memory merging in float32, though the GPU had room when merge "
     "started (another process took it since?): try -S merge.dtype=bfloat16 (half of float32's memory), or free "
     "the GPU, or merge on the CPU: CUDA_VISIBLE_DEVICES= dvc repro merge"),
    (lambda: predict.main(["폐경 후 비타민 D 보충은 골절을 줄이는가?"]), _forward_runs_out,
     "error: out of GPU memory answering with --max-new-tokens 24: pass a smaller --max-new-tokens"),
    (evaluate_base.main, _loading_runs_out,  # outside any stage's advice: loading the model
     "error: out of GPU memory (Tried to allocate 2.00 GiB): another process may hold the GPU (`nvidia-smi` lists "
     "them); free it and rerun"),
], ids=["evaluate_base", "evaluate", "merge", "predict", "loading"])
def test_out_of_gpu_memory_is_one_line_with_the_setting_that_helps(
        pipeline_run, tmp_path, monkeypatch, capsys, run, runs_out, expected):
    workspace = _workspace(pipeline_run, tmp_path, monkeypatch)
    before = _outputs(workspace)
    runs_out(monkeypatch)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run()
    assert stopped.value.code == 2
    assert _one_error_line(capsys.readouterr().err).startswith(expected)
    assert _outputs(workspace) == before


def _fill_limit() -> None:
    """In the child: files may grow to 400 KiB (the tiny merged model's weights are 0.8 MB); SIGXFSZ
    ignored, as Python itself does, so a write past the limit fails with EFBIG instead of killing."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400 * 1024, resource.RLIM_INFINITY))


def test_a_full_disk_during_merge_is_one_line_and_keeps_the_previous_merged_model(pipeline_run, tmp_path, monkeypatch):
    workspace = _workspace(pipeline_run, tmp_path, monkeypatch)
    before = _outputs(workspace)
    result = subprocess.run([sys.executable, "-m", "stages.merge"], cwd=workspace, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(workspace)}, preexec_fn=_fill_limit)
    assert result.returncode == 2, result.stderr[-3000:]
    line = _one_error_line(result.stderr)
    assert line.startswith("error: cannot write models/merged (about 8"), line  # the weights' size, from the config
    assert ": a file grew past the largest size allowed; " in line
    assert line.endswith("and this shell limits a file to 400 KiB: raise that (`ulimit -f unlimited`) or free space, "
                         "and rerun")
    assert _outputs(workspace) == before
    assert not list((workspace / "models").glob(".merged.*")), "the partial copy is removed"


def test_merge_refuses_before_loading_when_the_new_copy_does_not_fit(pipeline_run, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    workspace = _workspace(pipeline_run, tmp_path, monkeypatch)
    before = _outputs(workspace)
    needed = merge.weights_bytes("tiny-base", torch.float32)
    usage = shutil.disk_usage(workspace)
    # free: the size of the new copy itself, without the room for loading and merging
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=needed))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded the base model"))
    with pytest.raises(SystemExit):
        merge.main()
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: merge writes a new models/merged of about {needed / 2**30:.1f} GiB beside the previous one and needs "
        f"{needed * merge.HEADROOM / 2**30:.1f} GiB free, only {needed / 2**30:.1f} GiB of disk is free there; "
        "free some space (e.g. `dvc gc -w`) and rerun")
    assert _outputs(workspace) == before


WRITE_UNDER_LIMIT = textwrap.dedent("""
    import resource, signal, sys, torch
    from safetensors.torch import save_file
    from stages.errors import as_user_error, writing

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    big = {"w": torch.zeros(128, 1024)}
    for write in (lambda: torch.save(big, "big.pt"), lambda: save_file(big, "big.safetensors"),
                  lambda: open("big.txt", "w").write("x" * 2**20)):
        try:
            with writing("big", needed=512 * 1024):
                write()
        except Exception as exc:
            print(exc if type(exc).__name__ == "UserError" else f"not caught: {exc!r}")
""")


def test_the_libraries_write_failures_become_one_line(tmp_path):
    """torch.save, safetensors and plain Python writes past a file-size limit, as they really fail."""
    result = subprocess.run([sys.executable, "-c", WRITE_UNDER_LIMIT], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["cannot write big (about 512 KiB)"] * 3, lines
    assert lines[0].startswith("cannot write big (about 512 KiB): torch could not write a file whole (a full disk or a "
                               "file-size limit); ")
    assert all(": a file grew past the largest size allowed; " in line for line in lines[1:]), lines
    assert all(line.endswith("this shell limits a file to 64 KiB: raise that (`ulimit -f unlimited`) or free space, "
                             "and rerun") for line in lines), lines


def test_no_space_left_names_the_free_space(tmp_path):
    """A real ENOSPC (/dev/full), with no file name on the error: the caller's path is named."""
    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full (Linux's always-full device) here")
    with pytest.raises(OSError) as full:
        with open("/dev/full", "w") as handle:
            handle.write("x")
            handle.flush()
    assert full.value.errno == errno.ENOSPC and full.value.filename is None
    error = as_user_error(full.value, tmp_path / "out" / "merged", needed=3 * 2**30)
    free = shutil.disk_usage(tmp_path).free
    assert str(error) == (f"cannot write {tmp_path}/out/merged (about 3.0 GiB): no space left on the disk; "
                          f"{free / 2**30:.1f} GiB is free on the disk of {tmp_path}: free some space there "
                          "(`dvc gc -w` drops the cache of every result but the workspace's), and rerun")
    assert as_user_error(ValueError("no space left")) is None  # only what the disk said
    with pytest.raises(UserError, match="^cannot write metrics: no space left on the disk"):
        with writing(Path("metrics")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


HOLD_DVC_LOCK = textwrap.dedent("""
    import os, sys, time
    from dvc.repo import Repo
    from dvc.rwlock import rwlock

    kind, seconds = sys.argv[1], float(sys.argv[2])
    repo = Repo(".")
    if kind == "stage":  # as `dvc repro` holds it while merge's command runs
        held = rwlock(repo.tmp_dir, repo.fs, "/some/venv/bin/dvc repro", [os.path.abspath("models/adapter")],
                      [os.path.abspath("models/merged")], False)
    else:  # DVC's own work between stages (hashing, checkout)
        held = repo.lock
    with held:
        print("held", flush=True)
        time.sleep(seconds)
""")


@pytest.fixture
def locked_workspace(pipeline_run, tmp_path, monkeypatch):
    """A pipeline run with its dvc.lock (as `dvc repro` would have written it), and a way to hold DVC's lock."""
    workspace = _workspace(pipeline_run, tmp_path, monkeypatch)
    subprocess.run([sys.executable, "-m", "dvc", "commit", "-f", "-q"], cwd=workspace, check=True)
    script = tmp_path / "hold_dvc_lock.py"
    script.write_text(HOLD_DVC_LOCK, encoding="utf-8")
    holders = []

    def hold(kind: str, seconds: float) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, str(script), kind, str(seconds)], cwd=workspace,
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "held\n"
        holders.append(process)
        return process

    yield hold
    for process in holders:
        process.kill()
        process.wait()


@pytest.mark.parametrize("kind, command", [("stage", "`dvc repro`"), ("repository", "`python")],
                         ids=["stage-lock", "repository-lock"])
def test_predict_while_dvc_holds_the_lock_names_the_command(locked_workspace, monkeypatch, capsys, kind, command):
    holder = locked_workspace(kind, 120)
    monkeypatch.setattr(dvclock, "WAIT_S", 2)
    with pytest.raises(SystemExit) as stopped:
        predict.main(["질문?"])
    assert stopped.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {command}") and f"(pid {holder.pid}) holds DVC's lock on this project, and " \
        "predict needs it to check merge's outputs against dvc.lock (waited 2s): rerun when it has finished" in line


def test_predict_waits_for_a_short_dvc_command(locked_workspace, monkeypatch, capsys, caplog):
    holder = locked_workspace("stage", 3)
    with caplog.at_level("INFO", logger="stages"):
        predict.main(["질문?"])
    err = capsys.readouterr().err
    assert f"`dvc repro` (pid {holder.pid}) holds DVC's lock on this project; waiting up to 30s for it" in caplog.text
    assert err.startswith("answering from models/merged: adapter ") and "Traceback" not in err
    assert "new tokens at" in caplog.text  # then answered (the smoke model's answer is empty)
