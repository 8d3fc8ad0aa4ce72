"""Several GPUs: unsloth on one process vs N, and transformers on N, with the same data and effective batch.

    python -m benchmarks.bench_parallel --out RESULTS.json [--processes 2] [--steps 40] \
        [--transformers-steps 20] [--last-steps 20] [--model-dir /tmp/llama8b] [--skip-merge]

Run from the repository root on a host with N CUDA GPUs, like benchmarks/bench.py, whose 8B-shaped
random model, synthetic rows and helpers it reuses. Every variant is `python -m stages.train` with
train.num_processes set, so the stage's own accelerate relaunch is what is timed, while nvidia-smi
samples every GPU's memory. The parts run in this order, the results file rewritten after each:

1. unsloth, N processes, 12/N rows per device (effective batch 12)
   with UNSLOTH_TOKEN_BALANCE=1 (rows dealt by tokens), and the same as dealt (-unbalanced, =0)
2. unsloth, 1 process, 12 rows (the shipped default)
3. `python -m stages.merge` on the adapter of 1, compared with the adapter of 2: the same files,
   keys, shapes and config, close weights and per-step losses, and one merged weight checked
4. transformers + PEFT, N processes, 12/N rows per device
5. unsloth, N processes, 12 rows per device (the shipped per-device default: effective batch 12N)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench import environment, matmul_peak, model_info, read_metrics, synthetic_records, timed
from benchmarks.run_stages import prepare_workspace, run_stages

log = logging.getLogger("benchmarks.bench_parallel")

EFFECTIVE_BATCH = 12  # the recipe's rows per optimizer step
TOKEN_BALANCE = "UNSLOTH_TOKEN_BALANCE"
LOSS_FILE = Path("dvclive/train/plots/metrics/train/loss.tsv")


def variant_params(common: dict, backend: str, processes: int, per_device: int, steps: int) -> dict:
    return {**common, "model.backend": backend, "train.num_processes": processes, "train.max_steps": steps,
            "train.per_device_train_batch_size": per_device, "train.gradient_accumulation_steps": 1}


def gpu_memory_sampler(log_file: Path) -> subprocess.Popen:
    """nvidia-smi writes every GPU's used memory twice a second until stopped."""
    return subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits",
                             "-lms", "500"], stdout=log_file.open("w"), stderr=subprocess.DEVNULL)


def peak_memory_mib(log_file: Path) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for line in log_file.read_text().splitlines():
        index, _, used = line.partition(",")
        if used.strip().isdigit():
            peaks[index.strip()] = max(peaks.get(index.strip(), 0), int(used))
    return peaks


def losses(workspace: Path) -> list[float]:
    rows = (workspace / LOSS_FILE).read_text(encoding="utf-8").splitlines()[1:]  # step, timestamp?, loss
    return [float(row.split("\t")[-1]) for row in rows]


def train_variant(workspace: Path, template: Path, overrides: dict, flops_per_token: int, peak_tflops: float) -> dict:
    """One training run of the stage in a copy of the prepared template workspace."""
    shutil.rmtree(workspace, ignore_errors=True)
    shutil.copytree(template, workspace)
    prepare_workspace(workspace, overrides)
    sampler = gpu_memory_sampler(workspace / "gpu-memory.csv")
    try:
        seconds = run_stages(workspace, ["train"])
    finally:
        sampler.terminate()
        sampler.wait()
    metrics = {**read_metrics(workspace, "train.json")["train"], **read_metrics(workspace, "cost/train.json")["train"],
               **read_metrics(workspace, "info/train.json")}
    gpus = metrics["num_processes"]
    keys = ("backend", "num_processes", "effective_batch_size", "steady_tokens_per_s", "tokens_per_s", "runtime_s",
            "peak_gpu_memory_gib", "steps", "tokens_seen", "loss", "eval_loss_last")
    return {
        **{key: metrics[key] for key in keys},
        "step_s": round(metrics["runtime_s"] / max(metrics["steps"], 1), 2),
        "mfu_per_gpu": round(metrics["steady_tokens_per_s"] * flops_per_token / (peak_tflops * 1e12 * gpus), 4),
        "nvidia_smi_peak_mib": peak_memory_mib(workspace / "gpu-memory.csv"),
        "losses": losses(workspace),
        "stage_seconds": seconds["train"],
    }


def adapter_check(parallel: Path, single: Path, base_dir: Path) -> dict:
    """Merge the several-process adapter with the merge stage; compare it with the one-process adapter."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    seconds = run_stages(parallel, ["merge"])
    one, many = (load_file(w / "models/adapter/adapter_model.safetensors") for w in (single, parallel))
    # PEFT writes target_modules from a set: in any order.
    configs = [{k: sorted(v) if isinstance(v, list) else v
                for k, v in json.loads((w / "models/adapter/adapter_config.json").read_text()).items()}
               for w in (single, parallel)]
    files = [sorted(p.name for p in (w / "models/adapter").iterdir()) for w in (single, parallel)]
    same_layout = one.keys() == many.keys() and all(one[k].shape == many[k].shape and one[k].dtype == many[k].dtype
                                                    for k in one)
    flat = [torch.cat([t[k].float().flatten() for k in sorted(one)]) for t in (one, many)]
    # One merged weight against base + scale * B @ A, from the files alone.
    name = "model.layers.0.self_attn.q_proj.weight"
    prefix = "base_model.model." + name.removesuffix(".weight")
    a, b = many[prefix + ".lora_A.weight"].float(), many[prefix + ".lora_B.weight"].float()
    scale = configs[0]["lora_alpha"] / configs[0]["r"]

    def tensor(folder: Path, key: str):
        index = folder / "model.safetensors.index.json"
        shard = json.loads(index.read_text())["weight_map"][key] if index.exists() else "model.safetensors"
        with safe_open(str(folder / shard), framework="pt") as handle:
            return handle.get_tensor(key).float()

    base, merged = tensor(base_dir, name), tensor(parallel / "models/merged", name)
    delta = scale * (b @ a)
    return {
        "merge_stage_seconds": seconds["merge"],
        "same_files": files[0] == files[1],
        "same_keys_shapes_dtypes": same_layout,
        "same_config": configs[0] == configs[1],
        "tensors": len(one),
        "relative_difference": round(float((flat[0] - flat[1]).norm() / flat[0].norm()), 5),
        "cosine": round(float(torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0)), 5),
        "merged_weight": {
            "name": name,
            "max_error_over_bf16_step": round(float(((merged - base - delta).abs() / (base + delta).abs().clamp_min(
                1e-8) / 2**-8).max()), 3),
            "delta_cosine": round(float(torch.nn.functional.cosine_similarity((merged - base).flatten(),
                                                                              delta.flatten(), dim=0)), 4),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--processes", type=int, default=2, help="GPUs of the several-process variants")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of each unsloth run")
    parser.add_argument("--transformers-steps", type=int, default=20, help="steps of the (slower) transformers run")
    parser.add_argument("--last-steps", type=int, default=20, help="steps of part 5 (twice the rows per step)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/llama8b"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-parallel")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--only", nargs="*", metavar="PART",
                        help="run only these parts (names as in the results, e.g. unsloth-1proc merge)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import gc

    import torch

    from stages.outputs import dumps_json, write_json, write_text

    n = args.processes
    if EFFECTIVE_BATCH % n:
        parser.error(f"--processes {n} must divide the effective batch {EFFECTIVE_BATCH}")
    model_dir, work = args.model_dir.resolve(), args.work_dir.resolve()
    results = {"environment": {**environment("cuda"), "gpus": torch.cuda.device_count(),
                               "command": " ".join(["python -m benchmarks.bench_parallel", *sys.argv[1:]])}}
    results["matmul"] = timed(matmul_peak, "cuda")
    results["model"] = timed(model_info, model_dir, args.layers, "cuda", False)
    gc.collect()
    torch.cuda.empty_cache()
    records, lengths = synthetic_records(model_dir, args.rows)
    data_file = work / "synthetic_pubmedqa_ko.json"
    write_text(data_file, dumps_json(records))
    results["data"] = {"rows": args.rows, "estimated_tokens": lengths}
    no_eval_or_save = 1000  # neither runs inside the timed loop
    common = {"data.source": str(data_file), "model.name": str(model_dir), "model.base_16bit": str(model_dir),
              "model.load_in_4bit": True, "eval.rouge_tokenizer": "char", "train.eval_steps": no_eval_or_save,
              "train.save_steps": no_eval_or_save}
    template = work / "prepared"
    shutil.rmtree(template, ignore_errors=True)
    prepare_workspace(template, common)
    results["prepare_seconds"] = run_stages(template, ["prepare"])["prepare"]
    write_json(args.out, results)

    def variant(backend: str, processes: int, per_device: int, steps: int) -> dict:
        return variant_params(common, backend, processes, per_device, steps)

    flops, peak = results["model"]["flops_per_token"], results["matmul"]["tflops"]
    results["train"] = {}
    plan = [(f"unsloth-{n}proc", variant("unsloth", n, EFFECTIVE_BATCH // n, args.steps)),
            # the same, rows dealt to processes as they come instead of by tokens (launch.balance_tokens)
            (f"unsloth-{n}proc-unbalanced", variant("unsloth", n, EFFECTIVE_BATCH // n, args.steps)),
            ("unsloth-1proc", variant("unsloth", 1, EFFECTIVE_BATCH, args.steps)),
            ("merge", None),
            (f"transformers-{n}proc", variant("transformers", n, EFFECTIVE_BATCH // n, args.transformers_steps)),
            (f"unsloth-{n}proc-{EFFECTIVE_BATCH}perdevice", variant("unsloth", n, EFFECTIVE_BATCH, args.last_steps))]
    for name, overrides in plan:
        if args.only is not None and name not in args.only:
            continue
        if overrides is None:
            if not args.skip_merge and all("error" not in results["train"].get(k, {"error": 1})
                                           for k in (f"unsloth-{n}proc", "unsloth-1proc")):
                results["adapter_check"] = timed(adapter_check, work / f"unsloth-{n}proc", work / "unsloth-1proc",
                                                 model_dir, fatal=False)
        else:
            log.info("training %s", name)
            # unsloth's opt-in: each step's rows dealt to the processes in equal token counts
            os.environ[TOKEN_BALANCE] = "0" if name.endswith("-unbalanced") else "1"
            results["train"][name] = timed(train_variant, work / name, template, overrides, flops, peak, fatal=False)
        speeds = {k: v.get("steady_tokens_per_s") for k, v in results["train"].items()}
        if speeds.get(f"unsloth-{n}proc") and speeds.get("unsloth-1proc"):
            one, many = speeds["unsloth-1proc"], speeds[f"unsloth-{n}proc"]
            results["speedup_unsloth"] = round(many / one, 3)
            losses_one, losses_many = (results["train"][k]["losses"] for k in ("unsloth-1proc", f"unsloth-{n}proc"))
            results["max_step_loss_difference"] = round(max(abs(x - y) for x, y in zip(losses_one, losses_many)), 5)
        write_json(args.out, results)
    log.info("wrote %s", args.out)
    for name, run in results["train"].items():
        print(name, run.get("error") or f"{run['steady_tokens_per_s']:,.0f} tokens/s steady, {run['step_s']} s/step, "
              f"MFU/GPU {run['mfu_per_gpu']:.1%}, rank-0 peak {run['peak_gpu_memory_gib']} GiB, "
              f"nvidia-smi {run['nvidia_smi_peak_mib']} MiB, backend {run['backend']} x {run['num_processes']}")
    print({k: results.get(k) for k in ("speedup_unsloth", "max_step_loss_difference", "adapter_check")})


if __name__ == "__main__":
    main()
