"""Data-parallel training: two gloo processes, on one "machine" or on two, equal one process with the
same effective batch; the launch's mistakes are one line each."""

import csv
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_params
from stages import launch, paths, prepare, train
from stages.errors import UserError
from tools.smoke import dvc_environment

COMMON = {"train.max_steps": 2, "train.per_device_train_batch_size": 2, "train.eval_steps": 2, "train.save_steps": 2}


def _workspace(prepared: Path, dest: Path, overrides: dict) -> Path:
    shutil.copytree(prepared, dest, symlinks=True)
    write_params(dest, {**COMMON, **overrides})
    return dest


def _results(workspace: Path) -> tuple[dict, dict]:
    read = lambda path: json.loads((workspace / path).read_text(encoding="utf-8"))  # noqa: E731
    metrics = {"train_loss": read(paths.TRAIN_METRICS)["train"]["loss"], **read(paths.TRAIN_INFO)}
    return metrics, load_file(workspace / paths.ADAPTER_DIR / "adapter_model.safetensors")


def _train(workspace: Path) -> str:
    # As dvc runs it: `python -m stages.train`, which relaunches itself through accelerate.
    result = subprocess.run([sys.executable, "-m", "stages.train"], cwd=workspace, capture_output=True, text=True,
                            env=dvc_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.fixture(scope="module")
def prepared(smoke_template, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("multiprocess") / "prepared"
    shutil.copytree(smoke_template, dest, symlinks=True)
    subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=dest, check=True, capture_output=True,
                   env=dvc_environment())
    return dest


@pytest.fixture(scope="module")
def single(prepared, tmp_path_factory) -> tuple[dict, dict]:
    """One process, 2 rows x 2 accumulation steps: effective batch 4."""
    workspace = _workspace(prepared, tmp_path_factory.mktemp("single") / "ws",
                           {"train.gradient_accumulation_steps": 2, "train.num_processes": 1})
    _train(workspace)
    return _results(workspace)


def _assert_same_training(parallel: tuple[dict, dict], single: tuple[dict, dict]) -> None:
    (metrics, weights), (single_metrics, single_weights) = parallel, single
    assert (single_metrics["num_processes"], metrics["num_processes"]) == (1, 2)
    assert metrics["backend"] == single_metrics["backend"] == "transformers"
    assert metrics["effective_batch_size"] == single_metrics["effective_batch_size"] == 4
    assert metrics["tokens_seen"] == single_metrics["tokens_seen"]  # the same rows, split over two processes
    assert abs(metrics["train_loss"] - single_metrics["train_loss"]) < 1e-5
    assert any(w.abs().max() > 0 for w in single_weights.values())
    for name, weight in single_weights.items():
        torch.testing.assert_close(weights[name], weight, atol=1e-5, rtol=1e-4)


def test_two_processes_train_the_same_adapter_as_one(prepared, single, tmp_path):
    workspace = _workspace(prepared, tmp_path / "ws", {"train.gradient_accumulation_steps": 1,
                                                       "train.num_processes": 2})
    log = _train(workspace)
    assert "launching 2 processes, backend transformers" in log
    _assert_same_training(_results(workspace), single)
    assert (workspace / paths.TRAIN_CURVES / "train/loss.tsv").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_config(machine_rank: int, main_process_ip: str, main_process_port: int) -> dict:
    """An accelerate config file for one of two machines, as docs/several-gpus.md's Several machines shows it."""
    return {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 2,
            "machine_rank": machine_rank, "main_process_ip": main_process_ip, "main_process_port": main_process_port,
            "rdzv_backend": "static", "same_network": True}


def test_two_machines_train_the_same_adapter_as_one(prepared, single, tmp_path):
    # Two "machines" on localhost, each its own copy of the project running the stage with its own
    # config file (machine rank 0 and 1, static rendezvous); gloo between their one process each.
    port, machines, logs = _free_port(), [], []
    for rank in (0, 1):
        workspace = _workspace(prepared, tmp_path / f"machine{rank}", {
            "train.gradient_accumulation_steps": 1, "train.num_processes": 2,
            "train.accelerate_config": "accelerate.yaml"})
        (workspace / "accelerate.yaml").write_text(yaml.safe_dump(accelerate_config(rank, "127.0.0.1", port)))
        log = (tmp_path / f"machine{rank}.log").open("w")  # files, not pipes: a full pipe would stall its rank
        machines.append(subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=workspace, stdout=log,
                                         stderr=subprocess.STDOUT, env=dvc_environment()))
        logs.append(tmp_path / f"machine{rank}.log")
    for process, log in zip(machines, logs):
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    main_log = logs[0].read_text()
    assert "--config_file accelerate.yaml" in main_log and "launching 2 processes, backend transformers" in main_log
    _assert_same_training(_results(tmp_path / "machine0"), single)
    assert not (tmp_path / "machine1" / paths.ADAPTER_DIR).exists()  # one process writes the outputs


def test_accelerate_config_mistakes_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert launch.machines(2, None) == 1
    with pytest.raises(UserError, match="train.accelerate_config = nowhere.yaml: no such file; write one with"):
        launch.machines(2, "nowhere.yaml")
    Path("broken.yaml").write_text("num_machines: [2\n")
    with pytest.raises(UserError, match="broken.yaml: not a valid accelerate config"):
        launch.machines(2, "broken.yaml")
    Path("two.yaml").write_text(yaml.safe_dump(accelerate_config(0, "10.0.0.1", 29500)))
    assert launch.machines(16, "two.yaml") == 2
    for processes in (1, 3):
        with pytest.raises(UserError, match=f"spreads training over 2 machine.*train.num_processes = {processes}"):
            launch.machines(processes, "two.yaml")
    # On a GPU machine: 16 processes over 2 machines need 8 GPUs on each, not 16.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    launch.check_devices(16, True, machine_count=2)
    with pytest.raises(UserError, match=r"= 24 \(12 on each of 2 machines\) but this machine has 8 .*=16"):
        launch.check_devices(24, True, machine_count=2)


@pytest.mark.parametrize("overrides, expected", [
    ({"train.num_processes": 2, "train.accelerate_config": "missing.yaml"},
     "train.accelerate_config = missing.yaml: no such file"),
    ({"train.num_processes": 2, "model.backend": "unsloth"}, "model.backend = unsloth needs a CUDA GPU"),
])
def test_the_launch_fails_in_one_line_before_starting_processes(workspace, monkeypatch, capsys, overrides, expected):
    prepare.main()
    write_params(workspace, overrides)
    monkeypatch.setattr(launch, "launch", lambda *args: pytest.fail("launched despite the mistake"))
    with pytest.raises(SystemExit) as exit_:
        train.main()
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and expected in error and "Traceback" not in error


def test_one_process_is_pinned_to_one_gpu(monkeypatch):
    import os

    # Otherwise transformers' Trainer would run DataParallel over every GPU and grow the batch.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    launch.use_one_gpu(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    launch.use_one_gpu(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # the user's choice stands
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    launch.use_one_gpu(2)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ

