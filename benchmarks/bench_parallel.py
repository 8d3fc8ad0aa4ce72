"""Several GPUs: unsloth on one process vs N, and transformers on N, with the same data and effective batch.

    python -m benchmarks.bench_parallel --out RESULTS.json [--processes 2] [--steps 40] \
        [--transformers-steps 20] [--last-steps 20] [--model-dir /tmp/llama8b] [--skip-merge] \
        [--only PART ...] [--repeat K] [--reverse] [--no-warmup | --warmup-steps S] [--probe]

Run from the repository root on a host with N CUDA GPUs, like benchmarks/bench.py, whose 8B-shaped
random model, synthetic rows and helpers it reuses. Every variant is `python -m stages.train` with
train.num_processes set, so the stage's own accelerate relaunch is what is timed, while nvidia-smi
samples every GPU's memory. The parts run in this order, the results file rewritten after each:

0. host <-> GPU copy bandwidth of each GPU alone and of all at once (unsloth's offloaded
   gradient checkpointing copies every layer's input to host memory and back each step)
1. unsloth, 1 process, 12 rows (the shipped default)
2. unsloth, N processes, 12/N rows per device (effective batch 12), rows dealt as they come (as shipped)
3. unsloth, 1 process, 12/N rows: one GPU doing what each GPU of N does, without DDP
4. `python -m stages.merge` on the adapter of 2, compared with the adapter of 1: the same files,
   keys, shapes and config, close weights and per-step losses, and one merged weight checked
5. transformers + PEFT, N processes, 12/N rows per device
6. unsloth, N processes, 12 rows per device (the shipped per-device default: effective batch 12N),
   against unsloth on 1 process with 12 rows x N accumulation (the same effective batch)

Trials, run only when --only names them, each a variant of 1 or 2: -balanced
(UNSLOTH_TOKEN_BALANCE=1: rows dealt by tokens), -prefetch (UNSLOTH_GC_PREFETCH=1: the next
offloaded activation reloaded during this layer's backward; on 2 with balancing), -bf16-allreduce
(UNSLOTH_DDP_COMM_HOOK=bf16), -log10 (train.logging_steps=10: the Trainer waits for the GPU at every
logging step; per-step figures then cover 10 steps each), -nosync (benchmarks/trial_train.py: no
wait for the GPU between backward and optimizer step), -nosync-log10 (both: no wait inside 10 steps),
-cudnn (the same module: attention on cuDNN, as the stage ran it before 2026-11-26; the stage now
turns it off for unsloth, stages.unsloth_runtime.train_attention_without_cudnn), -exactslots (the
same module: unsloth's offload host slots sized as unsloth_zoo sizes them, grown at every new high,
as before 2026-11-26; the stage now gives them whole pinned blocks), -timed (the same module: each
host slot's creation and growth timed, per step and rank in "host_slots"; -exactslots runs are
timed too).
Every run also records late_tokens_per_s, from the log lines over the steps after the 10th alone.

Before anything is measured, one unmeasured run per process count warms the disk caches (Triton
kernels) that a first run on a fresh machine fills (--no-warmup skips it). With --repeat every
other round runs the parts in reverse order; speedups compare each part's mean over its rounds.

Each run's per-step times and tokens come from rank 0's log: besides tokens/s over the steps after
the first two ("steady") it records the median step's tokens/s and a least-squares fit of step
seconds = fixed + per-token x tokens, which separates per-step overhead from work that scales.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.bench import environment, matmul_peak, model_info, read_metrics, synthetic_records, timed
from benchmarks.run_stages import prepare_workspace, run_stages

log = logging.getLogger("benchmarks.bench_parallel")

EFFECTIVE_BATCH = 12  # the recipe's rows per optimizer step
BALANCED = {"UNSLOTH_TOKEN_BALANCE": "1"}  # unsloth's opt-in: each step's rows dealt in equal token counts
PREFETCH = {"UNSLOTH_GC_PREFETCH": "1"}  # unsloth's opt-in: reload the next offloaded activation early
BF16_ALLREDUCE = {"UNSLOTH_DDP_COMM_HOOK": "bf16"}  # unsloth's opt-in: gradients all-reduced in bf16
NO_STEP_SYNC = {"BENCH_NO_STEP_SYNC": "1"}  # train through benchmarks/trial_train.py: no waits inside a step
CUDNN_SDP = {"BENCH_CUDNN_SDP": "1"}  # the same: attention on cuDNN again, with its plan per new sequence length
TIMED_SLOTS = {"BENCH_TIME_HOST_SLOTS": "1"}  # the same: each offload host slot's creation and growth timed
EXACT_SLOTS = {"BENCH_EXACT_SLOTS": "1", **TIMED_SLOTS}  # the same: host slots sized as unsloth sizes them
TRIAL_KNOBS = tuple({**NO_STEP_SYNC, **CUDNN_SDP, **EXACT_SLOTS})  # any of them set: the run goes through trial_train
KNOBS = (*{**BALANCED, **PREFETCH, **BF16_ALLREDUCE}, *TRIAL_KNOBS)  # unset unless a variant sets them
LATE_AFTER = 10  # late_tokens_per_s: steps after this one, past the early steps' compiles and buffer growth
LOSS_FILE = Path("dvclive/train/plots/metrics/train/loss.tsv")
STEP_LINE = re.compile(r"step (\d+)/\d+ .*?\(([\d,]+) tokens in ([\d.]+) s\)")  # stages.callbacks.LogLine
STEP_START = re.compile(r"stages\.train: step (\d+)/\d+ ")  # every step's line, the first (no rate) included
SLOT_LINE = re.compile(r"benchmark trial: host slot rank (\d+) (new|grown) [\d.]+ -> [\d.]+ MiB in ([\d.]+) ms")


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


@contextmanager
def environment_for(overrides: dict):
    """The environment knobs (unsloth's and the trials') as this variant sets them, unset unless named,
    restored afterwards."""
    saved = {key: os.environ.pop(key, None) for key in KNOBS}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def copy_bandwidth(size_mib: int = 512, repeats: int = 5) -> dict:
    """GB/s of pinned host <-> GPU copies, each GPU alone and all GPUs at once (threads)."""
    import torch

    def one(device: int, out: dict) -> None:
        host = torch.empty(size_mib * 2**20, dtype=torch.uint8, pin_memory=True)
        gpu = torch.empty_like(host, device=f"cuda:{device}")
        for name, (dst, src) in {"to_gpu": (gpu, host), "to_host": (host, gpu)}.items():
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(repeats):
                dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            out[name] = round(size_mib * 2**20 * repeats / (time.perf_counter() - started) / 1e9, 1)

    devices = range(torch.cuda.device_count())
    result = {}
    for device in devices:
        result[f"gpu{device}_alone"] = {}
        one(device, result[f"gpu{device}_alone"])
    together = {f"gpu{device}_together": {} for device in devices}
    threads = [threading.Thread(target=one, args=(d, together[f"gpu{d}_together"])) for d in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.cuda.empty_cache()
    return {**result, **together}


def topology() -> dict:
    result = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True)
    return {"nvidia_smi_topo": result.stdout.strip().splitlines()}


def step_times(log_file: Path) -> dict:
    """Per optimizer step, from rank 0's log lines (stages.callbacks.LogLine): seconds and tokens."""
    text = log_file.read_text(encoding="utf-8", errors="replace")
    return {"steps": [{"step": int(m.group(1)), "seconds": float(m.group(3)), "tokens": int(m.group(2).replace(",", ""))}
                      for m in STEP_LINE.finditer(text)]}


def host_slot_times(log_file: Path) -> list[dict]:
    """Per step and rank, the offload host slots made or grown (benchmarks/trial_train.py, BENCH_TIME_HOST_SLOTS).

    Each slot line counts toward the first step logged after it; -timed and -exactslots runs log them.
    """
    text = log_file.read_text(encoding="utf-8", errors="replace")
    found, pending = {}, []
    for m in re.finditer(f"{STEP_START.pattern}|{SLOT_LINE.pattern}", text):
        if m.group(1) is None:  # a slot line: groups 2-4 are SLOT_LINE's
            pending.append((int(m.group(2)), m.group(3), float(m.group(4))))
            continue
        step = int(m.group(1))
        for rank, kind, ms in pending:
            entry = found.setdefault((step, rank), {"step": step, "rank": rank, "new": 0, "grown": 0, "ms": 0.0})
            entry[kind] += 1
            entry["ms"] = round(entry["ms"] + ms, 2)
        pending = []
    return [found[key] for key in sorted(found)]


def step_fit(steps: list[dict], skip: int = 2) -> dict:
    """Median tokens/s and seconds = fixed + per_token * tokens, over the steps after the first `skip`."""
    kept = [s for s in steps if s["step"] > skip and s["seconds"] > 0]
    if len(kept) < 3:
        return {}
    x, y = [s["tokens"] for s in kept], [s["seconds"] for s in kept]
    mean_x, mean_y = statistics.fmean(x), statistics.fmean(y)
    spread = sum((v - mean_x) ** 2 for v in x)
    slope = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / spread if spread else 0.0
    rates = sorted(n / t for n, t in zip(x, y))
    return {
        "median_step_tokens_per_s": round(statistics.median(rates)),
        "step_tokens_per_s_p10_p90": [round(rates[len(rates) // 10]), round(rates[(9 * len(rates)) // 10])],
        "fixed_s_per_step": round(mean_y - slope * mean_x, 4),
        "ms_per_1k_tokens": round(slope * 1000 * 1000, 2),
        "fitted_steps": len(kept),
    }


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
    handicapped (benchmarks/README.md, "Run order").
    """
    seen, warm = set(), []
    for name, overrides, env in parts:
        if overrides is None:
            continue
        shape = tuple(overrides[key] for key in ("model.backend", "train.num_processes",
                                                  "train.per_device_train_batch_size"))
        if shape not in seen:
            seen.add(shape)
            warm.append((name, overrides, env))
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
    """(name, params, env) of the parts to run, in plan order: those named, else every part but the trials."""
    return [(name, params, env) for name, params, env, trial in plan
            if (name in only if only is not None else not trial)]


def probe_results(workspace: Path) -> dict:
    """benchmarks/probe_train.py's files: each rank's profile, and the steps that compiled something."""
    ranks = {}
    for path in sorted(workspace.glob("probe-rank*.json")):
        probe = json.loads(path.read_text(encoding="utf-8"))
        ranks[f"rank{probe['rank']}"] = {
            "profile": probe["profile"],
            "step_seconds": [s["seconds"] for s in probe["steps"]],
            "compiling_steps": [s for s in probe["steps"] if s["new_graphs"] or s["triton_compiles"]],
        }
    return ranks


def train_variant(workspace: Path, template: Path, overrides: dict, flops_per_token: int, peak_tflops: float,
                  probe: bool = False) -> dict:
    """One training run of the stage in a copy of the prepared template workspace (profiled: probe)."""
    module = ("benchmarks.probe_train" if probe else
              "benchmarks.trial_train" if any(os.environ.get(key) for key in TRIAL_KNOBS) else "train")
    shutil.rmtree(workspace, ignore_errors=True)
    shutil.copytree(template, workspace)
    prepare_workspace(workspace, overrides)
    sampler = gpu_memory_sampler(workspace / "gpu-memory.csv")
    log_file = workspace / "train.log"
    try:
        seconds = run_stages(workspace, [module], log_file)
    finally:
        sampler.terminate()
        sampler.wait()
    metrics = {**read_metrics(workspace, "train.json")["train"], **read_metrics(workspace, "cost/train.json")["train"],
               **read_metrics(workspace, "info/train.json")}
    gpus = metrics["num_processes"]
    keys = ("backend", "num_processes", "effective_batch_size", "steady_tokens_per_s", "tokens_per_s", "runtime_s",
            "peak_gpu_memory_gib", "steps", "tokens_seen", "loss", "eval_loss_last")
    per_step = step_times(log_file)
    if any(os.environ.get(key) for key in NO_STEP_SYNC):  # its token count lags between logging steps: steady is not exact
        metrics["steady_tokens_per_s"] = None
    return {
        **{key: metrics[key] for key in keys},
        "unsloth_env": {key: os.environ[key] for key in KNOBS if key in os.environ},
        **step_fit(per_step["steps"]),
        "late_tokens_per_s": late_tokens_per_s(per_step["steps"], overrides.get("train.logging_steps", 1)),
        "step_s": round(metrics["runtime_s"] / max(metrics["steps"], 1), 2),
        "mfu_per_gpu": metrics["steady_tokens_per_s"] and round(
            metrics["steady_tokens_per_s"] * flops_per_token / (peak_tflops * 1e12 * gpus), 4),
        "nvidia_smi_peak_mib": peak_memory_mib(workspace / "gpu-memory.csv"),
        "losses": losses(workspace),
        "stage_seconds": next(iter(seconds.values())),
        **({"probe": probe_results(workspace)} if probe else {}),
        **({"host_slots": host_slot_times(log_file)} if any(os.environ.get(key) for key in TIMED_SLOTS) else {}),
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
    parser.add_argument("--last-steps", type=int, default=20, help="steps of part 6 (N times the rows per step)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/llama8b"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-parallel")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--probe", action="store_true",
                        help="train through benchmarks/probe_train.py: profiled steps (its speeds are not for claims)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the chosen parts this many times, every other round in reverse order")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="first train once, unmeasured, with each process count the chosen parts use")
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
    half, many = EFFECTIVE_BATCH // n, f"unsloth-{n}proc"
    every_10 = {"train.logging_steps": 10}  # the Trainer syncs host and GPU (.item()) at each logging step
    # (name, params, unsloth env, trial): a trial runs only when --only names it
    plan = [("copy_bandwidth", None, {}, False),
            ("unsloth-1proc", variant("unsloth", 1, EFFECTIVE_BATCH, args.steps), {}, False),
            (many, variant("unsloth", n, half, args.steps), {}, False),
            (f"unsloth-1proc-{half}rows", variant("unsloth", 1, half, args.steps), {}, False),
            ("merge", None, {}, False),
            (f"transformers-{n}proc", variant("transformers", n, half, args.transformers_steps), {}, False),
            (f"{many}-{EFFECTIVE_BATCH}perdevice", variant("unsloth", n, EFFECTIVE_BATCH, args.last_steps), {}, False),
            (f"unsloth-1proc-{EFFECTIVE_BATCH}x{n}", variant("unsloth", 1, EFFECTIVE_BATCH, args.last_steps, n), {},
             False),
            (f"{many}-balanced", variant("unsloth", n, half, args.steps), BALANCED, True),
            (f"{many}-prefetch", variant("unsloth", n, half, args.steps), {**BALANCED, **PREFETCH}, True),
            ("unsloth-1proc-prefetch", variant("unsloth", 1, EFFECTIVE_BATCH, args.steps), PREFETCH, True),
            (f"{many}-bf16-allreduce", variant("unsloth", n, half, args.steps), BF16_ALLREDUCE, True),
            ("unsloth-1proc-log10", {**variant("unsloth", 1, EFFECTIVE_BATCH, args.steps), **every_10}, {}, True),
            (f"{many}-log10", {**variant("unsloth", n, half, args.steps), **every_10}, {}, True),
            ("unsloth-1proc-nosync", variant("unsloth", 1, EFFECTIVE_BATCH, args.steps), NO_STEP_SYNC, True),
            (f"{many}-nosync", variant("unsloth", n, half, args.steps), NO_STEP_SYNC, True),
            ("unsloth-1proc-nosync-log10", {**variant("unsloth", 1, EFFECTIVE_BATCH, args.steps), **every_10},
             NO_STEP_SYNC, True),
            (f"{many}-nosync-log10", {**variant("unsloth", n, half, args.steps), **every_10}, NO_STEP_SYNC, True),
            ("unsloth-1proc-cudnn", variant("unsloth", 1, EFFECTIVE_BATCH, args.steps), CUDNN_SDP, True),
            (f"{many}-cudnn", variant("unsloth", n, half, args.steps), CUDNN_SDP, True),
            (f"{many}-cudnn-{EFFECTIVE_BATCH}perdevice", variant("unsloth", n, EFFECTIVE_BATCH, args.last_steps),
             CUDNN_SDP, True),
            (f"unsloth-1proc-cudnn-{EFFECTIVE_BATCH}x{n}", variant("unsloth", 1, EFFECTIVE_BATCH, args.last_steps, n),
             CUDNN_SDP, True),
            ("unsloth-1proc-timed", variant("unsloth", 1, EFFECTIVE_BATCH, args.steps), TIMED_SLOTS, True),
            (f"{many}-timed", variant("unsloth", n, half, args.steps), TIMED_SLOTS, True),
            ("unsloth-1proc-exactslots", variant("unsloth", 1, EFFECTIVE_BATCH, args.steps), EXACT_SLOTS, True),
            (f"{many}-exactslots", variant("unsloth", n, half, args.steps), EXACT_SLOTS, True),
            (f"{many}-exactslots-{EFFECTIVE_BATCH}perdevice", variant("unsloth", n, EFFECTIVE_BATCH, args.last_steps),
             EXACT_SLOTS, True),
            (f"unsloth-1proc-exactslots-{EFFECTIVE_BATCH}x{n}",
             variant("unsloth", 1, EFFECTIVE_BATCH, args.last_steps, n), EXACT_SLOTS, True)]
    chosen = parts_to_run(plan, args.only)
    if args.probe and any(key in env for _, _, env in chosen for key in TRIAL_KNOBS):
        parser.error("--probe runs benchmarks/probe_train.py, not the trials of benchmarks/trial_train.py: "
                     "leave the trials out of --only, or --probe off")
    if args.warmup:
        results["warmup"] = {}
        for name, overrides, env in warmup_parts(chosen):
            log.info("warming up with %s (not measured)", name)
            with environment_for(env):
                run = timed(train_variant, work / f"warmup-{name}", template,
                            {**overrides, "train.max_steps": args.warmup_steps or args.steps}, flops, peak, fatal=False)
            results["warmup"][name] = {k: run.get(k) for k in ("steady_tokens_per_s", "late_tokens_per_s", "seconds",
                                                               "error") if k in run}
    # several processes against one: the same effective batch, then the shipped rows per device
    pairs = [(many, "unsloth-1proc"), (f"{many}-balanced", "unsloth-1proc"),
             (f"{many}-bf16-allreduce", "unsloth-1proc"), (f"{many}-log10", "unsloth-1proc-log10"),
             (f"{many}-nosync", "unsloth-1proc-nosync"), (f"{many}-nosync-log10", "unsloth-1proc-nosync-log10"),
             (f"{many}-cudnn", "unsloth-1proc-cudnn"),
             (f"{many}-cudnn-{EFFECTIVE_BATCH}perdevice", f"unsloth-1proc-cudnn-{EFFECTIVE_BATCH}x{n}"),
             (f"{many}-timed", "unsloth-1proc-timed"), (f"{many}-exactslots", "unsloth-1proc-exactslots"),
             (f"{many}-exactslots-{EFFECTIVE_BATCH}perdevice", f"unsloth-1proc-exactslots-{EFFECTIVE_BATCH}x{n}"),
             (f"{many}-{EFFECTIVE_BATCH}perdevice", f"unsloth-1proc-{EFFECTIVE_BATCH}x{n}"),
             (f"{many}-{EFFECTIVE_BATCH}perdevice", "unsloth-1proc")]
    # a trial against the same run without it
    trials = [("unsloth-1proc-nosync", "unsloth-1proc"), (f"{many}-nosync", many),
              ("unsloth-1proc-nosync-log10", "unsloth-1proc"), (f"{many}-nosync-log10", many),
              ("unsloth-1proc-cudnn", "unsloth-1proc"), (f"{many}-cudnn", many),
              (f"{many}-cudnn-{EFFECTIVE_BATCH}perdevice", f"{many}-{EFFECTIVE_BATCH}perdevice"),
              (f"unsloth-1proc-cudnn-{EFFECTIVE_BATCH}x{n}", f"unsloth-1proc-{EFFECTIVE_BATCH}x{n}"),
              ("unsloth-1proc-timed", "unsloth-1proc"), (f"{many}-timed", many),
              # the stage's slot sizing over unsloth's, both timed (an -exactslots run is timed too)
              ("unsloth-1proc-timed", "unsloth-1proc-exactslots"), (f"{many}-timed", f"{many}-exactslots")]
    results["order"] = []  # the keys in the order they ran (the file's keys are sorted)
    for round_, parts in rounds(chosen[::-1] if args.reverse else chosen, args.repeat):
        for name, overrides, env in parts:
            key = name if round_ == 0 else f"{name}#{round_ + 1}"
            results["order"].append(key)
            if name == "copy_bandwidth":
                if round_ == 0:
                    results["copy_bandwidth"] = {**topology(), **timed(copy_bandwidth, fatal=False)}
            elif overrides is None:
                if round_ == 0 and not args.skip_merge and all(
                        "error" not in results["train"].get(k, {"error": 1}) for k in (many, "unsloth-1proc")):
                    results["adapter_check"] = timed(adapter_check, work / many, work / "unsloth-1proc", model_dir,
                                                     fatal=False)
            else:
                log.info("training %s", key)
                with environment_for(env):
                    results["train"][key] = timed(train_variant, work / key, template, overrides, flops, peak,
                                                  args.probe, fatal=False)
            # over every round's run of each part
            results["speedups"] = ratios(mean_by_part(results["train"], "steady_tokens_per_s"), pairs)
            # after step LATE_AFTER, from the log lines alone: the measure that trial_train's runs keep exact
            results["late_speedups"] = ratios(mean_by_part(results["train"], "late_tokens_per_s"), pairs + trials)
            if all("losses" in results["train"].get(k, {}) for k in ("unsloth-1proc", many)):
                losses_one, losses_many = (results["train"][k]["losses"] for k in ("unsloth-1proc", many))
                results["max_step_loss_difference"] = round(max(abs(x - y) for x, y in zip(losses_one, losses_many)),
                                                            5)
            write_json(args.out, results)
    log.info("wrote %s", args.out)
    for name, run in results["train"].items():
        print(name, run.get("error") or f"{run['steady_tokens_per_s'] or 0:,.0f} tokens/s steady, "
              f"{run['late_tokens_per_s'] or 0:,} late, median step "
              f"{run.get('median_step_tokens_per_s', 0):,} tokens/s, fixed {run.get('fixed_s_per_step')} s + "
              f"{run.get('ms_per_1k_tokens')} ms/1k tokens, {run['step_s']} s/step, "
              f"MFU/GPU {run['mfu_per_gpu'] or 0:.1%}, rank-0 peak {run['peak_gpu_memory_gib']} GiB, "
              f"nvidia-smi {run['nvidia_smi_peak_mib']} MiB, backend {run['backend']} x {run['num_processes']}")
    print({k: results.get(k) for k in ("speedups", "late_speedups", "max_step_loss_difference", "adapter_check")})


if __name__ == "__main__":
    main()
