"""Several GPUs: unsloth on one process vs N, and transformers on N, with the same data and effective batch.

    python -m benchmarks.bench_parallel --out RESULTS.json [--processes 2] [--steps 40] \
        [--transformers-steps 20] [--last-steps 20] [--model-dir /tmp/llama8b] [--skip-merge] \
        [--only PART ...] [--repeat K] [--reverse] [--no-warmup | --warmup-steps S]

Run from the repository root on a host with N CUDA GPUs, like benchmarks/bench.py, whose 8B-shaped
random model, synthetic rows and helpers it reuses. Every variant is `python -m stages.train` with
train.num_processes set, so the stage's own accelerate relaunch is what is timed, while nvidia-smi
samples every GPU's memory. The parts run in this order, the results file rewritten after each:

1. unsloth-1proc: unsloth, 1 process, 12 rows (the shipped default)
2. unsloth-Nproc: unsloth, N processes, 12/N rows per device (effective batch 12)
3. merge: `python -m stages.merge` on the adapter of 2, compared with the adapter of 1: the same
   files, keys, shapes and config, close weights and per-step losses, and one merged weight checked
4. transformers-Nproc: transformers + PEFT, N processes, 12/N rows per device
5. unsloth-Nproc-12perdevice: unsloth, N processes, 12 rows per device (the shipped per-device
   default: effective batch 12N), against unsloth-1proc-12xN: 1 process with 12 rows x N
   accumulation (the same effective batch)

Before anything is measured, one unmeasured run per backend, process count and rows per device
warms the disk caches (Triton kernels) that a first run on a fresh machine fills (--no-warmup
skips it). --reverse runs the parts backwards (the second call of an A-B-B-A pair); with --repeat
every other round runs them in reverse order; speedups compare each part's mean over its rounds.

Each run records the stage's steady tokens/s (the steps after the first two, validation and saves
left out), late tokens/s from the log lines over the steps after the 10th alone, MFU per GPU,
rank 0's peak allocated and reserved memory, every GPU's nvidia-smi peak, the per-step losses and
the per-step tokens and seconds from rank 0's log.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench import environment, matmul_peak, model_info, read_metrics, synthetic_records, timed
from benchmarks.run_stages import prepare_workspace, run_stages

log = logging.getLogger("benchmarks.bench_parallel")

EFFECTIVE_BATCH = 12  # the recipe's rows per optimizer step
LATE_AFTER = 10  # late_tokens_per_s: steps after this one, past the early steps' compiles and buffer growth
LOSS_FILE = Path("dvclive/train/plots/metrics/train/loss.tsv")
STEP_LINE = re.compile(r"step (\d+)/\d+ .*?\(([\d,]+) tokens in ([\d.]+) s\)")  # stages.callbacks.LogLine


def synthetic_data(work: Path, model_dir: Path, rows: int) -> tuple[dict, dict]:
    """The synthetic rows written under `work` for the model's tokenizer: the params every run shares
    (4-bit; validation and checkpoints kept out of the timed loop) and the rows' estimated lengths."""
    from stages.outputs import dumps_json, write_text

    records, lengths = synthetic_records(model_dir, rows)
    data_file = work / "synthetic_pubmedqa_ko.json"
    write_text(data_file, dumps_json(records))
    no_eval_or_save = 1000
    common = {"data.source": str(data_file), "model.name": str(model_dir), "model.base_16bit": str(model_dir),
              "model.load_in_4bit": True, "eval.rouge_tokenizer": "char", "train.eval_steps": no_eval_or_save,
              "train.save_steps": no_eval_or_save}
    return common, lengths


def variant_params(common: dict, backend: str, processes: int, per_device: int, steps: int,
                   accumulation: int = 1) -> dict:
    return {**common, "model.backend": backend, "train.num_processes": processes, "train.max_steps": steps,
            "train.per_device_train_batch_size": per_device, "train.gradient_accumulation_steps": accumulation}


def step_times(log_file: Path) -> dict:
    """Per optimizer step, from rank 0's log lines (stages.callbacks.LogLine): seconds and tokens."""
    text = log_file.read_text(encoding="utf-8", errors="replace")
    return {"steps": [{"step": int(m.group(1)), "seconds": float(m.group(3)), "tokens": int(m.group(2).replace(",", ""))}
                      for m in STEP_LINE.finditer(text)]}


def late_tokens_per_s(steps: list[dict], logging_steps: int, after: int = LATE_AFTER) -> float | None:
    """Tokens/s over the logged windows that start after step `after` (each line covers the steps since the last)."""
    kept = [s for s in steps if ((s["step"] - 1) // logging_steps) * logging_steps >= after]
    seconds = sum(s["seconds"] for s in kept)
    return round(sum(s["tokens"] for s in kept) / seconds) if seconds else None


def warmup_parts(parts: list[tuple]) -> list[tuple]:
    """The first training part of each backend, process count and rows per device among `parts`.

    Each is run once before anything is measured. The first run on a fresh machine compiles and
    caches on disk the Triton kernels of every shape it meets (for a DDP rank: its own share of
    each batch), so later runs skip what it paid: without a warm-up the first part measured is
    handicapped (benchmarks/README.md, "Method").
    """
    seen, warm = set(), []
    for name, overrides in parts:
        if overrides is None:
            continue
        shape = tuple(overrides[key] for key in ("model.backend", "train.num_processes",
                                                  "train.per_device_train_batch_size"))
        if shape not in seen:
            seen.add(shape)
            warm.append((name, overrides))
    return warm


def rounds(parts: list[tuple], repeat: int) -> list[tuple[int, list[tuple]]]:
    """(round, its parts): the plan's order, then reversed, alternately, so that drift within a session
    weighs on every part alike."""
    return [(r, parts if r % 2 == 0 else parts[::-1]) for r in range(repeat)]


def mean_by_part(train: dict, measure: str) -> dict[str, float]:
    """Each part's mean `measure` over its rounds (keys name, name#2, ...); failed runs left out."""
    values: dict[str, list[float]] = {}
    for key, run in train.items():
        if run.get(measure):
            values.setdefault(key.split("#")[0], []).append(run[measure])
    return {name: statistics.fmean(found) for name, found in values.items()}


def ratios(means: dict[str, float], pairs: list[tuple[str, str]]) -> dict[str, float]:
    return {f"{a} / {b}": round(means[a] / means[b], 3) for a, b in pairs if means.get(a) and means.get(b)}


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


def parts_to_run(plan: list[tuple], only: list[str] | None) -> list[tuple]:
    """(name, params) of the parts to run, in plan order: those named, else every part."""
    return [(name, params) for name, params in plan if only is None or name in only]


def train_variant(workspace: Path, template: Path, overrides: dict, flops_per_token: int, peak_tflops: float) -> dict:
    """One training run of the stage in a copy of the prepared template workspace."""
    shutil.rmtree(workspace, ignore_errors=True)
    shutil.copytree(template, workspace)
    prepare_workspace(workspace, overrides)
    sampler = gpu_memory_sampler(workspace / "gpu-memory.csv")
    log_file = workspace / "train.log"
    try:
        seconds = run_stages(workspace, ["train"], log_file)
    finally:
        sampler.terminate()
        sampler.wait()
    metrics = {**read_metrics(workspace, "train.json")["train"], **read_metrics(workspace, "cost/train.json")["train"],
               **read_metrics(workspace, "info/train.json")}
    gpus = metrics["num_processes"]
    keys = ("backend", "num_processes", "effective_batch_size", "steady_tokens_per_s", "tokens_per_s", "runtime_s",
            "peak_gpu_memory_gib", "steps", "tokens_seen", "loss", "eval_loss_last")
    per_step = step_times(log_file)
    return {
        **{key: metrics[key] for key in keys},
        "late_tokens_per_s": late_tokens_per_s(per_step["steps"], overrides.get("train.logging_steps", 1)),
        "step_s": round(metrics["runtime_s"] / max(metrics["steps"], 1), 2),
        "mfu_per_gpu": metrics["steady_tokens_per_s"] and round(
            metrics["steady_tokens_per_s"] * flops_per_token / (peak_tflops * 1e12 * gpus), 4),
        "nvidia_smi_peak_mib": peak_memory_mib(workspace / "gpu-memory.csv"),
        "losses": losses(workspace),
        "stage_seconds": seconds["train"],
        **per_step,
    }


def cosine(x, y) -> float:
    """Cosine similarity of two tensors taken flat, summed in float64.

    float32 sums over an adapter's ~40M weights drift past 1 (the results before 2026-11-26 say 1.0097).
    """
    x, y = x.double().flatten(), y.double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


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
        "cosine": round(cosine(flat[0], flat[1]), 5),
        "merged_weight": {
            "name": name,
            "max_error_over_bf16_step": round(float(((merged - base - delta).abs() / (base + delta).abs().clamp_min(
                1e-8) / 2**-8).max()), 3),
            "delta_cosine": round(cosine(merged - base, delta), 4),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--processes", type=int, default=2, help="GPUs of the several-process variants")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of each unsloth run")
    parser.add_argument("--transformers-steps", type=int, default=20, help="steps of the (slower) transformers run")
    parser.add_argument("--last-steps", type=int, default=20, help="steps of part 5 (N times the rows per step)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/llama8b"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-parallel")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the chosen parts this many times, every other round in reverse order")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="first train once, unmeasured, with each backend, process count and rows per device")
    parser.add_argument("--warmup-steps", type=int, help="steps of each warm-up run (default: --steps)")
    parser.add_argument("--reverse", action="store_true",
                        help="run the chosen parts in reverse plan order (a second call's half of an A-B-B-A)")
    parser.add_argument("--only", nargs="*", metavar="PART",
                        help="run only these parts (names as in the results, e.g. unsloth-1proc merge)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import gc

    import torch

    from stages.outputs import write_json

    n = args.processes
    if EFFECTIVE_BATCH % n:
        parser.error(f"--processes {n} must divide the effective batch {EFFECTIVE_BATCH}")
    half, many, transformers = EFFECTIVE_BATCH // n, f"unsloth-{n}proc", f"transformers-{n}proc"
    per_device, accumulated = f"{many}-{EFFECTIVE_BATCH}perdevice", f"unsloth-1proc-{EFFECTIVE_BATCH}x{n}"
    names = ("unsloth-1proc", many, "merge", transformers, per_device, accumulated)  # the plan's order, below
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:  # before the model is built
        parser.error(f"--only {' '.join(unknown)}: the parts are {', '.join(names)}")
    model_dir, work = args.model_dir.resolve(), args.work_dir.resolve()
    results = {"environment": {**environment("cuda"), "gpus": torch.cuda.device_count(),
                               "command": " ".join(["python -m benchmarks.bench_parallel", *sys.argv[1:]])}}
    results["matmul"] = timed(matmul_peak, "cuda")
    results["model"] = timed(model_info, model_dir, args.layers, "cuda", False)
    gc.collect()
    torch.cuda.empty_cache()
    common, lengths = synthetic_data(work, model_dir, args.rows)
    results["data"] = {"rows": args.rows, "estimated_tokens": lengths}
    template = work / "prepared"
    shutil.rmtree(template, ignore_errors=True)
    prepare_workspace(template, common)
    results["prepare_seconds"] = run_stages(template, ["prepare"])["prepare"]
    write_json(args.out, results)

    def variant(backend: str, processes: int, per_device: int, steps: int, accumulation: int = 1) -> dict:
        return variant_params(common, backend, processes, per_device, steps, accumulation)

    flops, peak = results["model"]["flops_per_token"], results["matmul"]["tflops"]
    results["train"] = {}
    plan = list(zip(names, (variant("unsloth", 1, EFFECTIVE_BATCH, args.steps),
                            variant("unsloth", n, half, args.steps),
                            None,  # merge
                            variant("transformers", n, half, args.transformers_steps),
                            variant("unsloth", n, EFFECTIVE_BATCH, args.last_steps),
                            variant("unsloth", 1, EFFECTIVE_BATCH, args.last_steps, n)), strict=True))
    chosen = parts_to_run(plan, args.only)
    if args.warmup:
        results["warmup"] = {}
        for name, overrides in warmup_parts(chosen):
            log.info("warming up with %s (not measured)", name)
            run = timed(train_variant, work / f"warmup-{name}", template,
                        {**overrides, "train.max_steps": args.warmup_steps or args.steps}, flops, peak, fatal=False)
            results["warmup"][name] = {k: run.get(k) for k in ("steady_tokens_per_s", "late_tokens_per_s", "seconds",
                                                               "error") if k in run}
    # several processes against one at the same effective batch; the shipped rows per device against both
    pairs = [(many, "unsloth-1proc"), (transformers, "unsloth-1proc"), (many, transformers),
             (per_device, accumulated), (per_device, "unsloth-1proc")]
    results["order"] = []  # the keys in the order they ran (the file's keys are sorted)
    for round_, parts in rounds(chosen[::-1] if args.reverse else chosen, args.repeat):
        for name, overrides in parts:
            key = name if round_ == 0 else f"{name}#{round_ + 1}"
            results["order"].append(key)
            if overrides is None:
                if round_ == 0 and not args.skip_merge and all(
                        "error" not in results["train"].get(k, {"error": 1}) for k in (many, "unsloth-1proc")):
                    results["adapter_check"] = timed(adapter_check, work / many, work / "unsloth-1proc", model_dir,
                                                     fatal=False)
            else:
                log.info("training %s", key)
                results["train"][key] = timed(train_variant, work / key, template, overrides, flops, peak, fatal=False)
            # over every round's run of each part
            results["speedups"] = ratios(mean_by_part(results["train"], "steady_tokens_per_s"), pairs)
            results["late_speedups"] = ratios(mean_by_part(results["train"], "late_tokens_per_s"), pairs)
            if all("losses" in results["train"].get(k, {}) for k in ("unsloth-1proc", many)):
                losses_one, losses_many = (results["train"][k]["losses"] for k in ("unsloth-1proc", many))
                results["max_step_loss_difference"] = round(max(abs(x - y) for x, y in zip(losses_one, losses_many)),
                                                            5)
            write_json(args.out, results)
    log.info("wrote %s", args.out)
    for name, run in results["train"].items():
        print(name, run.get("error") or f"{run['steady_tokens_per_s'] or 0:,.0f} tokens/s steady, "
              f"{run['late_tokens_per_s'] or 0:,} late, {run['step_s']} s/step, "
              f"MFU/GPU {run['mfu_per_gpu'] or 0:.1%}, rank-0 peak {run['peak_gpu_memory_gib']} GiB, "
              f"nvidia-smi {run['nvidia_smi_peak_mib']} MiB, backend {run['backend']} x {run['num_processes']}")
    print({k: results.get(k) for k in ("speedups", "late_speedups", "max_step_loss_difference", "adapter_check")})


if __name__ == "__main__":
    main()
