"""Data-parallel training: the train stage relaunches itself through `accelerate launch`.

dvc.yaml keeps `python -m stages.train`; with train.num_processes > 1 that process starts
`accelerate launch --multi_gpu --num_processes N -m stages.train` (DDP through torchrun: NCCL on
GPUs, gloo on a CPU) and exits with its exit code. Each launched process sees WORLD_SIZE.
With train.accelerate_config the launch reads that accelerate config file too, so its machine
count, machine rank and main process address spread the N processes over several machines:
each machine runs the stage with its own file (docs/several-gpus.md, Several machines).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from stages.errors import UserError

log = logging.getLogger("stages.train")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def needs_launch(num_processes: int, config_file: str | None = None) -> bool:
    """True in the process dvc started when several (or a config file) are asked for and none is launched yet."""
    return (num_processes > 1 or config_file is not None) and "LOCAL_RANK" not in os.environ


def machines(num_processes: int, config_file: str | None) -> int:
    """How many machines the processes spread over: 1, or the config file's num_machines (checked)."""
    if config_file is None:
        return 1
    import yaml

    where = f"train.accelerate_config = {config_file}"
    if not Path(config_file).is_file():
        raise UserError(f"{where}: no such file; write one with `accelerate config --config_file {config_file}` "
                        "on this machine (docs/several-gpus.md, Several machines) or set it to null")
    try:
        config = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))  # YAML or JSON, as accelerate reads
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: not a valid accelerate config ({str(exc).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a text file (not UTF-8); point it at an accelerate config (YAML)") from None
    except OSError as exc:
        raise UserError(f"{where}: cannot be read ({exc.strerror})") from None
    count = config.get("num_machines", 1) if isinstance(config, dict) else None
    if not isinstance(count, int) or count < 1:
        raise UserError(f"{where}: not an accelerate config file (no whole num_machines >= 1 in it)")
    if num_processes < 2 or num_processes % count:
        raise UserError(f"{where} spreads training over {count} machine(s), but train.num_processes = "
                        f"{num_processes}: set it to the processes of all machines together, a multiple of "
                        f"{count} and at least 2")
    # What accelerate needs to join several machines (its launch reads them; a missing one is a
    # traceback there, after DVC has started the stage); the port may be left to its default.
    rank, address = config.get("machine_rank"), config.get("main_process_ip")
    if count > 1 and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < count):
        raise UserError(f"{where}: machine_rank = {rank}: give this machine's rank, a whole number from 0 to "
                        f"{count - 1} (num_machines = {count})")
    if count > 1 and not (isinstance(address, str) and address.strip()):
        raise UserError(f"{where}: no main_process_ip: give the address of the machine of rank 0")
    return count


def check_devices(num_processes: int, on_cuda: bool, machine_count: int = 1) -> None:
    if on_cuda:
        import torch

        available, wanted = torch.cuda.device_count(), num_processes // machine_count
        if available < wanted:
            per_machine = f" ({wanted} on each of {machine_count} machines)" if machine_count > 1 else ""
            raise UserError(
                f"train.num_processes = {num_processes}{per_machine} but this machine has {available} CUDA "
                f"GPU(s); set -S train.num_processes={available * machine_count}"
            )


def use_one_gpu(num_processes: int) -> None:
    """One process on a multi-GPU host trains on the first GPU only.

    Left alone, transformers' Trainer would wrap the model in DataParallel over every visible GPU
    and silently multiply the batch by their number. Must run before CUDA is initialised.
    """
    if num_processes == 1 and "LOCAL_RANK" not in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"


def launch(num_processes: int, config_file: str | None, backend: str, module: str = "stages.train") -> int:
    # The file gives where the processes run; the params keep what they run: DDP, their
    # number (all machines together) and the precision the stage chooses itself.
    where = ["--config_file", str(config_file)] if config_file else ["--num_machines", "1"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *where, "--multi_gpu", "--num_processes",
        str(num_processes), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module,
    ]
    log.info("launching %d processes, backend %s: %s", num_processes, backend, " ".join(command[1:]))
    launcher = subprocess.Popen(command)
    try:
        return launcher.wait()
    except BaseException:
        # Ctrl-C reached the whole process group; a SIGTERM sent to this process alone (`kill`) did
        # not: pass it on, so the launcher stops its processes instead of leaving them on the GPUs.
        launcher.terminate()
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            launcher.kill()
        raise


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
