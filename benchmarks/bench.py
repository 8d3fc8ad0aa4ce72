"""Benchmark a GPU host: bf16 matmul peak, training throughput and MFU per backend, generation, pipeline.

    python -m benchmarks.bench --out RESULTS.json [--family llama|qwen3] [--model-dir DIR] [--layers N] \
        [--rows 500] [--backends unsloth transformers] [--train-steps 7] [--skip-pipeline] [--skip-generation] \
        [--device cuda]

Run from the repository root; no network and no `dvc` command line needed. A random-weight
8B-shaped model of --family (Llama-3.1-8B or Qwen3-8B) is built in --model-dir (default
/tmp/llama8b, /tmp/qwen3-8b) when it holds none (benchmarks/random_model.py),
and synthetic PubMedQA-format rows with realistic Korean lengths stand in for the dataset. Every
stage runs as `python -m stages.<name>` through benchmarks/run_stages.py, in scratch workspaces
under --work-dir. Results go to --out after each part (so a crash keeps what was measured), and
a markdown summary is printed at the end. `--tiny --device cpu` is for testing this script only.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from itertools import cycle
from pathlib import Path

from benchmarks.random_model import MODEL_DIRS, SHAPES
from benchmarks.run_stages import parse_value
from tools.smoke import ROOT

log = logging.getLogger("benchmarks.bench")

SAMPLE = ROOT / "data/sample/pubmedqa_ko_sample.json"
SAMPLE_ROWS = 48
# Row lengths in tokens (prompt + answer): PubMedQA-Ko rows mostly run 1.3-1.6k, a few are short.
TOKENS_LOW, TOKENS_MODE, TOKENS_HIGH = 300, 1300, 1600


def environment(device: str) -> dict:
    import torch

    from stages.checkpoints import library_versions  # the versions metrics/info/train.json records

    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "versions": library_versions(),
        "date": datetime.now(timezone.utc).date().isoformat(),
        "command": shlex.join(["python", "-m", "benchmarks.bench", *sys.argv[1:]]),
    }


def matmul_peak(device: str, runs: int = 20) -> dict:
    """Measured bf16 matmul throughput: the ceiling MFU is taken against (not the datasheet's)."""
    import torch

    on_cuda = device.startswith("cuda")
    n = 8192 if on_cuda else 1024  # a CPU only needs to show the code path works
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = []
    for run in range(-3, runs):  # three warm-up runs, not kept
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            started = time.perf_counter()
            a @ b
            elapsed = time.perf_counter() - started
        if run >= 0:
            seconds.append(elapsed)
    median = statistics.median(seconds)
    return {"size": n, "dtype": "bfloat16", "runs": runs, "median_ms": round(median * 1e3, 3),
            "tflops": round(2 * n**3 / median / 1e12, 2)}


def model_info(model_dir: Path, layers: int | None, device: str, tiny: bool, family: str = "llama") -> dict:
    """Build the model when model_dir holds none; its parameter counts and FLOPs per trained token."""
    built = not (model_dir / "config.json").exists()
    if built and tiny:
        from tools.tiny_model import build_tiny_model

        build_tiny_model(model_dir, SAMPLE, family=family)
    elif built:
        from benchmarks.random_model import build

        build(model_dir, layers, device, family)
    counts = count_params(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
    # A frozen base with LoRA and activation recomputation costs about 6 N FLOPs per token: forward
    # 2N, recomputed forward 2N, input-gradient backward 2N (no weight gradients for the frozen base;
    # the LoRA matmuls and attention's sequence-length terms are a few percent and left out).
    return {"dir": str(model_dir), "built": built, **counts, "flops_per_token": 6 * counts["n_matmul_params"]}


def count_params(config: dict) -> dict:
    """Parameter counts of a Llama-like decoder from config.json alone (no weights loaded; Qwen3's
    q/k norms, 2 x head_dim a layer, left out)."""
    h, inter, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "vocab_size"))
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attention = h * head_dim * (2 * heads + 2 * kv_heads)  # q, o: heads x head_dim; k, v: kv_heads x head_dim
    mlp = 3 * h * inter  # gate, up, down
    lm_head = 0 if config.get("tie_word_embeddings") else vocab * h
    total = vocab * h + layers * (attention + mlp + 2 * h) + h + lm_head  # + RMSNorm weights
    # The input embedding is a table lookup, not a matmul; the output projection is one even when tied.
    return {"n_params": total, "n_matmul_params": layers * (attention + mlp) + vocab * h}


def synthetic_records(model_dir: Path, rows: int) -> tuple[list[dict], dict]:
    """rows PubMedQA-format records made from the sample, abstracts lengthened to a seeded spread of lengths.

    Tokens are counted as stages.prepare counts them (the model's tokenizer on the rendered chat), per
    paragraph plus the rest of the chat, so a growing row is never re-tokenised (within ~1% of prepare).
    """
    from stages.modeling import load_tokenizer
    from stages.params import load_params
    from stages.prompt import build_messages, encode, render_prompt_completion

    tokenizer = load_tokenizer(str(model_dir))
    system = load_params(ROOT / "params.yaml").prompt.system
    sample = json.loads(SAMPLE.read_text(encoding="utf-8"))[:SAMPLE_ROWS]
    pool = [p for record in sample for p in record["CONTEXTS"]]
    cost = {p: len(encode(tokenizer, p)) + 1 for p in pool}  # + the "\n\n" between paragraphs
    rng = random.Random(0)
    records, lengths = [], []
    for i in range(rows):
        source = sample[i % len(sample)]
        question = f"{source['QUESTION']} (사례 {i + 1})"
        target = rng.triangular(TOKENS_LOW, TOKENS_HIGH, TOKENS_MODE)
        # Everything but the paragraphs: system turn, question, "초록:" header, answer, template.
        prompt, completion = render_prompt_completion(
            tokenizer, build_messages(system, question, [""], True, source["LONG_ANSWER"]))
        total = len(encode(tokenizer, prompt)) + len(encode(tokenizer, completion))
        start = rng.randrange(len(pool))
        contexts = []
        for paragraph in cycle(source["CONTEXTS"] + pool[start:] + pool[:start]):
            if contexts and total + cost[paragraph] / 2 > target:  # stop at the nearest length
                break
            contexts.append(paragraph)
            total += cost[paragraph]
        lengths.append(total)
        records.append({"pubid": f"bench{i:06d}", "QUESTION": question, "CONTEXTS": contexts,
                        "LONG_ANSWER": source["LONG_ANSWER"], "final_decision": source["final_decision"]})
    stats = {"min": min(lengths), "mean": round(statistics.mean(lengths)), "max": max(lengths)}
    return records, stats


def run_in(workspace: Path, overrides: dict, stages: list[str], fresh: bool = True) -> dict[str, float]:
    """The stages' wall seconds; a failed stage raises SystemExit (from run_stages)."""
    from benchmarks.run_stages import prepare_workspace, run_stages

    if fresh:
        shutil.rmtree(workspace, ignore_errors=True)  # no checkpoint of an earlier run is resumed
    prepare_workspace(workspace, overrides)
    return run_stages(workspace, stages)


def read_metrics(workspace: Path, name: str) -> dict:
    return json.loads((workspace / "metrics" / name).read_text(encoding="utf-8"))


def train_backend(workspace: Path, overrides: dict, flops_per_token: int, peak_tflops: float) -> dict:
    seconds = run_in(workspace, overrides, ["prepare", "train"])
    metrics = {**read_metrics(workspace, "cost/train.json")["train"], **read_metrics(workspace, "info/train.json")}
    keys = ("steady_tokens_per_s", "tokens_per_s", "runtime_s", "peak_gpu_memory_gib", "steps", "tokens_seen")
    return {
        **{key: metrics[key] for key in keys},
        "step_s": round(metrics["runtime_s"] / max(metrics["steps"], 1), 2),
        "mfu": round(metrics["steady_tokens_per_s"] * flops_per_token / (peak_tflops * 1e12), 4)
        if peak_tflops else None,  # a loaded CPU's 1024³ matmul can round to 0.0 TFLOP/s
        "stage_seconds": seconds,
        "prepared_tokens": {k: v for k, v in read_metrics(workspace, "info/prepare.json").items() if k.startswith("tokens_")},
    }


def generation(workspace: Path, overrides: dict) -> dict:
    seconds = run_in(workspace, overrides, ["evaluate_base"], fresh=False)  # data prepared by train_backend
    return {**read_metrics(workspace, "cost/evaluate_base.json")["evaluate_base"],
            **read_metrics(workspace, "info/evaluate_base.json")["generation"], "stage_seconds": seconds["evaluate_base"]}


def pipeline(workspace: Path, overrides: dict) -> dict:
    """A first run, then what `dvc exp run -S lora.r=8` reruns (train, merge, evaluate)."""
    seconds = run_in(workspace, overrides, ["validate", "prepare", "train", "merge", "evaluate_base", "evaluate"])
    costs = {stage: read_metrics(workspace, f"cost/{stage}.json")[stage] for stage in ("evaluate_base", "evaluate")}
    experiment = run_in(workspace, {**overrides, "lora.r": 8}, ["train", "merge", "evaluate"], fresh=False)
    return {"stage_seconds": seconds, "total_seconds": round(sum(seconds.values()), 1), "evaluation_cost": costs,
            "experiment_stage_seconds": experiment, "experiment_seconds": round(sum(experiment.values()), 1),
            "experiment_evaluation_cost": read_metrics(workspace, "cost/evaluate.json")["evaluate"]}


def small_card(workspace: Path, overrides: dict, card_gib: float) -> dict:
    """evaluate_base once more while another process holds all but `card_gib` of the GPU, as on a
    24 GB RTX 3090/4090: `eval.batch_size: auto` must adapt, never run out of memory."""
    import subprocess

    import torch

    _, total = torch.cuda.mem_get_info()
    held = int(total - card_gib * 2**30)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, torch; "
                               f"x = torch.empty({held}, dtype=torch.uint8, device='cuda'); print('held', flush=True); "
                               "time.sleep(3600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", "the memory holder did not start"
        seconds = run_in(workspace, overrides, ["evaluate_base"], fresh=False)
    finally:
        holder.kill()
        holder.wait()
    return {"card_gib": card_gib, "held_gib": round(held / 2**30, 1), "stage_seconds": seconds["evaluate_base"],
            **read_metrics(workspace, "cost/evaluate_base.json")["evaluate_base"]}


def timed(step, *args, fatal: bool = True) -> dict:
    """step(*args), a dict, with its wall seconds; unless fatal, a failure is recorded and the run goes on."""
    started = time.perf_counter()
    try:
        result = step(*args)
    except (Exception, SystemExit) as exc:  # SystemExit: run_stages' way of saying a stage failed
        if fatal:
            raise
        log.error("%s failed: %s", step.__name__, exc)
        result = {"error": f"{type(exc).__name__}: {exc}"}
    return {**result, "seconds": round(time.perf_counter() - started, 1)}


def summary_table(results: dict) -> str:
    rows = [("device", results["environment"]["device"]),
            (f"bf16 matmul {results['matmul']['size']}³", f"{results['matmul']['tflops']} TFLOP/s")]
    for backend, run in results["train"].items():
        memory = run.get("peak_gpu_memory_gib", {})
        rows.append((f"train {backend}", run.get("error") or (
            f"{run['steady_tokens_per_s']:,.0f} tokens/s steady, {run['step_s']} s/step, MFU {run['mfu'] or 0:.1%}, "
            f"peak {memory['allocated']}/{memory['reserved']} GiB allocated/reserved")))
    if "unsloth_over_transformers" in results:
        rows.append(("unsloth / transformers", f"{results['unsloth_over_transformers']:.2f}x"))
    if run := results.get("generation"):
        rows.append(("generation", run.get("error") or (
            f"{run['new_tokens_per_s']:,.0f} new tokens/s, {run['mean_new_tokens']:.0f} mean new tokens, "
            f"batch {run['batch_size']}, stage {run['stage_seconds']} s")))
    if run := results.get("pipeline"):
        stages = ", ".join(f"{name} {seconds} s" for name, seconds in run.get("stage_seconds", {}).items())
        rows.append(("pipeline", run.get("error") or f"{stages}; total {run['total_seconds']} s"))
    return "\n".join(["| part | result |", "| --- | --- |", *(f"| {part} | {text} |" for part, text in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--family", choices=sorted(SHAPES), default="llama", help="the 8B shape of a model built now")
    parser.add_argument("--model-dir", type=Path, help="built here when it has no config.json "
                        f"(default: {', '.join(f'{k} {v}' for k, v in MODEL_DIRS.items())})")
    parser.add_argument("--layers", type=int, help="decoder layers of a model built now (default: the family's)")
    parser.add_argument("--rows", type=int, default=500, help="synthetic data rows")
    parser.add_argument("--backends", nargs="+", default=["unsloth", "transformers"],
                        choices=["unsloth", "transformers"])
    parser.add_argument("--train-steps", type=int, default=7, help="optimizer steps of each timed training run")
    parser.add_argument("--skip-train", action="store_true", help="no per-backend training runs")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--card-gib", type=float, default=24.0,
                        help="after the pipeline, evaluate_base on this much of the GPU (0: skip)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-work")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="params for the timed training runs, e.g. train.per_device_train_batch_size=6")
    parser.add_argument("--tiny", action="store_true", help="build a tiny test model instead (CPU testing only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import torch

    from stages.outputs import dumps_json, write_json, write_text

    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU here; use --device cpu (with --tiny) to test")
    if not on_cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the stages must not find a GPU either
    # Stages run in other folders: every path they are given must be absolute.
    model_dir, work_dir = (args.model_dir or MODEL_DIRS[args.family]).resolve(), args.work_dir.resolve()
    results = {"environment": environment(args.device), "family": args.family}
    results["matmul"] = timed(matmul_peak, args.device)
    peak = results["matmul"]["tflops"]
    log.info("bf16 matmul: %s TFLOP/s", peak)
    results["model"] = timed(model_info, model_dir, args.layers, args.device, args.tiny, args.family)
    if on_cuda:  # neither the matmul's nor a built model's memory may stay reserved while the stages run
        gc.collect()
        torch.cuda.empty_cache()
    write_json(args.out, results)

    started = time.perf_counter()
    records, lengths = synthetic_records(model_dir, args.rows)
    data_file = work_dir / "synthetic_pubmedqa_ko.json"
    write_text(data_file, dumps_json(records))
    results["data"] = {"file": str(data_file), "rows": args.rows, "estimated_tokens": lengths,
                       "seconds": round(time.perf_counter() - started, 1)}
    log.info("wrote %d synthetic rows to %s, tokens per row %s", args.rows, data_file, lengths)

    common = {"data.source": str(data_file), "model.name": str(model_dir), "model.base_16bit": str(model_dir),
              "model.load_in_4bit": on_cuda, "eval.rouge_tokenizer": "char"}  # no Kiwi model on the GPU host
    no_eval_or_save = max(1000, args.train_steps + 1)  # neither runs inside the timed loop
    short = {**common, "model.max_seq_length": 2048, "train.max_steps": args.train_steps,
             "train.eval_steps": no_eval_or_save, "train.save_steps": no_eval_or_save, "eval.max_new_tokens": 256,
             **{key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)}}
    results["train_overrides"] = args.set
    results["train"] = {}
    for backend in [] if args.skip_train else args.backends:
        log.info("training with %s for %d steps", backend, args.train_steps)
        results["train"][backend] = timed(train_backend, work_dir / f"train-{backend}",
                                          {**short, "model.backend": backend}, results["model"]["flops_per_token"],
                                          peak, fatal=False)
        write_json(args.out, results)
    speeds = {backend: run.get("steady_tokens_per_s") for backend, run in results["train"].items()}
    if speeds.get("unsloth") and speeds.get("transformers"):
        results["unsloth_over_transformers"] = round(speeds["unsloth"] / speeds["transformers"], 2)

    first = args.backends[0]
    if not args.skip_generation:
        results["generation"] = timed(generation, work_dir / f"train-{first}", {**short, "model.backend": first},
                                      fatal=False)
        write_json(args.out, results)
    if not args.skip_pipeline:  # params as shipped (60 steps, eval and save every 10)
        results["pipeline"] = timed(pipeline, work_dir / "pipeline", {**common, "model.backend": first}, fatal=False)
        write_json(args.out, results)
        if on_cuda and args.card_gib and "error" not in results["pipeline"]:
            results["small_card"] = timed(small_card, work_dir / "pipeline", {**common, "model.backend": first},
                                          args.card_gib, fatal=False)
            write_json(args.out, results)
    log.info("wrote %s", args.out)
    print(summary_table(results))


if __name__ == "__main__":
    main()
