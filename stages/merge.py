"""Merge: fold the LoRA adapter into the 16-bit base model, for plain transformers inference.

    python -m stages.merge          (or: dvc repro merge)

Reads models/adapter/ and `model.base_16bit` (hub id or local folder; a local folder touches
no network); writes models/merged/ (safetensors shards, config, generation config, tokenizer
with its chat template). Without unsloth; on the GPU when its free memory holds the 16-bit
weights, else on the CPU: the real 8B recipe needs about 16 GB of free (GPU or CPU) memory and
16 GB of disk, checked before anything is loaded.
"""

from __future__ import annotations

import logging
import shutil
import time

from stages import paths
from stages.cli import no_arguments
from stages.errors import UserError, gpu_memory_advice, stage_entrypoint, writing
from stages.modeling import load_errors
from stages.outputs import atomic_dir, check_writable, remove_stale_temporaries
from stages.params import load_params

log = logging.getLogger("stages.merge")

GIB = 2**30
HEADROOM = 1.15  # loading and merging need somewhat more than the weights themselves


def weights_bytes(base: str, dtype) -> int:
    """Size of the base model's weights in `dtype`, from its config alone (no weights loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with load_errors("model.base_16bit", base):
        config = AutoConfig.from_pretrained(base)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in skeleton.parameters()) * dtype.itemsize


def merge_device(needed: int) -> str:
    """cuda when the GPU's free memory holds the weights with room to spare (faster), else cpu."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    free, _ = torch.cuda.mem_get_info()
    return "cuda" if free >= needed * HEADROOM else "cpu"


def check_resources(needed: int, device: str) -> None:
    import psutil

    available = psutil.virtual_memory().available
    if device == "cpu" and available < needed * HEADROOM:
        raise UserError(
            f"merge needs about {needed * HEADROOM / GIB:.1f} GiB of free memory for model.base_16bit, "
            f"{available / GIB:.1f} GiB is available; close other programs or merge on a larger machine"
        )
    paths.MERGED_DIR.parent.mkdir(parents=True, exist_ok=True)
    # The new copy is written beside the previous models/merged, which stays until it is complete.
    free_disk = shutil.disk_usage(paths.MERGED_DIR.parent).free
    if free_disk < needed * HEADROOM:
        raise UserError(
            f"merge writes a new {paths.MERGED_DIR} of about {needed / GIB:.1f} GiB beside the previous one and "
            f"needs {needed * HEADROOM / GIB:.1f} GiB free, only {free_disk / GIB:.1f} GiB of disk is free there; "
            "free some space (e.g. `dvc gc -w`) and rerun"
        )


def out_of_memory_advice(dtype: str) -> str:
    halve = "-S merge.dtype=bfloat16 (half of float32's memory), or " if dtype == "float32" else ""
    return (f"out of GPU memory merging in {dtype}, though the GPU had room when merge started (another "
            f"process took it since?): try {halve}free the GPU, or merge on the CPU: "
            "CUDA_VISIBLE_DEVICES= dvc repro merge")


def merged_model(base: str, dtype, device: str = "cpu"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with load_errors("model.base_16bit", base):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, low_cpu_mem_usage=True,
                                                     device_map={"": device})
    model = PeftModel.from_pretrained(model, str(paths.ADAPTER_DIR))
    return model.merge_and_unload()


@stage_entrypoint
def main() -> None:
    params = load_params()
    if not (paths.ADAPTER_DIR / "adapter_config.json").exists():
        raise UserError(f"{paths.ADAPTER_DIR} holds no adapter; run `dvc repro train` first")
    import torch
    from transformers import AutoTokenizer

    base, dtype = params.model.base_16bit, getattr(torch, params.merge.dtype)
    started = time.perf_counter()
    check_writable(paths.MERGED_DIR)
    for stale in remove_stale_temporaries(paths.MERGED_DIR):  # a killed merge's 16 GB, before the disk check
        log.info("removed %s, left by a merge that was stopped", stale)
    needed = weights_bytes(base, dtype)
    device = merge_device(needed)
    check_resources(needed, device)
    log.info("merging %s into %s (%s, %.1f GiB, on the %s)", paths.ADAPTER_DIR, base, params.merge.dtype,
             needed / GIB, "GPU" if device == "cuda" else "CPU")
    with gpu_memory_advice(lambda: out_of_memory_advice(params.merge.dtype)):
        model = merged_model(base, dtype, device)
    # The adapter folder holds the tokenizer used in training, chat template included.
    tokenizer = AutoTokenizer.from_pretrained(paths.ADAPTER_DIR)
    with writing(paths.MERGED_DIR, needed), atomic_dir(paths.MERGED_DIR) as out_dir:
        model.save_pretrained(out_dir, max_shard_size="5GB")
        tokenizer.save_pretrained(out_dir)
    log.info("wrote %s in %.1fs", paths.MERGED_DIR, time.perf_counter() - started)


if __name__ == "__main__":
    no_arguments(__spec__.name, __doc__)
    main()
