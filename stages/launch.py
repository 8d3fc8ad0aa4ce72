"""Data-parallel training: the train stage relaunches itself through `accelerate launch`.

dvc.yaml keeps `python -m stages.train`; with train.num_processes > 1 that process starts
`accelerate launch --multi_gpu --num_processes N -m stages.train` (DDP through torchrun: NCCL on
GPUs, gloo on a CPU) and exits with its exit code. Each launched process sees WORLD_SIZE.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from stages.errors import UserError

log = logging.getLogger("stages.train")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def needs_launch(num_processes: int) -> bool:
    """True in the process dvc started when several are asked for and none is launched yet."""
    return num_processes > 1 and "LOCAL_RANK" not in os.environ


def check_devices(num_processes: int, on_cuda: bool) -> None:
    if on_cuda:
        import torch

        available = torch.cuda.device_count()
        if available < num_processes:
            raise UserError(
                f"train.num_processes = {num_processes} but this machine has {available} CUDA GPU(s); "
                f"set -S train.num_processes={available}"
            )


def use_one_gpu(num_processes: int) -> None:
    """One process on a multi-GPU host trains on the first GPU only.

    Left alone, transformers' Trainer would wrap the model in DataParallel over every visible GPU
    and silently multiply the batch by their number. Must run before CUDA is initialised.
    """
    if num_processes == 1 and "LOCAL_RANK" not in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"


def launch(num_processes: int, module: str = "stages.train") -> int:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module,
    ]
    log.info("launching %d processes: %s", num_processes, " ".join(command[1:]))
    return subprocess.run(command).returncode


def bind_device(on_cuda: bool) -> None:
    """Each launched process trains on its own GPU (LOCAL_RANK), set before any model is loaded."""
    if on_cuda and "LOCAL_RANK" in os.environ:
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def finish() -> None:
    """Let every process reach the end before any exits, then close the process group cleanly.

    A rank that exits while another still writes its outputs tears down gloo/NCCL under it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
