"""Data-parallel training: two gloo processes equal one process with the same effective batch."""

import csv
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import write_params
from stages import paths, prepare
from stages.errors import UserError
from tools.smoke import dvc_environment


def _train() -> dict:
    # As dvc runs it: `python -m stages.train`, which relaunches itself through accelerate.
    result = subprocess.run([sys.executable, "-m", "stages.train"], capture_output=True, text=True,
                            env=dvc_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(paths.TRAIN_METRICS.read_text(encoding="utf-8"))


def test_two_processes_train_the_same_adapter_as_one(workspace):
    common = {"train.max_steps": 2, "train.per_device_train_batch_size": 2, "train.eval_steps": 2,
              "train.save_steps": 2}
    prepare.main()
    write_params(workspace, {**common, "train.gradient_accumulation_steps": 2, "train.num_processes": 1})
    single = _train()
    single_weights = load_file(paths.ADAPTER_DIR / "adapter_model.safetensors")

    write_params(workspace, {**common, "train.gradient_accumulation_steps": 1, "train.num_processes": 2})
    parallel = _train()
    parallel_weights = load_file(paths.ADAPTER_DIR / "adapter_model.safetensors")

    assert (single["num_processes"], parallel["num_processes"]) == (1, 2)
    assert single["effective_batch_size"] == parallel["effective_batch_size"] == 4
    assert parallel["tokens_seen"] == single["tokens_seen"]  # the same rows, split over two processes
    assert abs(parallel["train_loss"] - single["train_loss"]) < 1e-5
    assert any(w.abs().max() > 0 for w in single_weights.values())
    for name, weight in single_weights.items():
        torch.testing.assert_close(parallel_weights[name], weight, atol=1e-5, rtol=1e-4)
    with open(paths.DVCLIVE_TRAIN_DIR / "plots/metrics/train/loss.tsv", encoding="utf-8") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle, delimiter="\t")]
    assert steps == [1, 2]  # one process writes the curves: each step once


def test_unsloth_refuses_several_processes_in_one_line():
    from stages.modeling import choose_backend

    assert choose_backend("auto", num_processes=2) == "transformers"
    try:
        choose_backend("unsloth", num_processes=2)
    except UserError as error:
        assert "trains on one GPU only" in str(error) and "model.backend=transformers" in str(error)
    else:
        raise AssertionError("unsloth with 2 processes must be refused")


def test_one_process_is_pinned_to_one_gpu(monkeypatch):
    import os

    from stages import launch

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
