"""Generation speed of the evaluate stage's own code under different batch sizes and KV caches.

    python -m benchmarks.bench_generation --out RESULTS.json [--model-dir /tmp/llama8b] [--prompts 50]

Builds the random Llama-3.1-8B-shaped model when --model-dir holds none, renders --prompts
synthetic test questions (300-1,600 tokens, as benchmarks/bench.py makes them) with the
pipeline's chat, and times stages.evaluation.generate_answers for each variant on the bf16
model. New tokens/s counts generated tokens up to the end-of-turn, as metrics/cost/evaluate.json does.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from benchmarks.bench import synthetic_records
from stages.params import EvalParams
from stages.prompt import build_messages, render_prompt

log = logging.getLogger("benchmarks.bench_generation")

# (batch size, KV cache): the dynamic cache is transformers' default; the static one lets
# generate() compile the decoding step (CUDA graphs), which removes the per-layer launch overhead.
VARIANTS = [(16, "dynamic"), (50, "dynamic"), (50, "static")]


def prompts_for(model_dir: Path, n_prompts: int, tokenizer, system: str) -> list[str]:
    records, _ = synthetic_records(model_dir, n_prompts)
    return [render_prompt(tokenizer, build_messages(system, r["QUESTION"], r["CONTEXTS"], True)) for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/llama8b"))
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from benchmarks.random_llama import build
    from stages.evaluation import generate_answers
    from stages.modeling import load_for_inference, load_tokenizer
    from stages.params import load_params

    if not (args.model_dir / "config.json").exists():
        build(args.model_dir)
        torch.cuda.empty_cache()
    tokenizer = load_tokenizer(str(args.model_dir))
    model = load_for_inference(str(args.model_dir), "model")
    prompts = prompts_for(args.model_dir, args.prompts, tokenizer, load_params().prompt.system)
    results = {"device": torch.cuda.get_device_name(), "prompts": len(prompts), "variants": []}
    for batch_size, cache in VARIANTS:
        eval_params = EvalParams(batch_size=batch_size, max_new_tokens=args.max_new_tokens, cache=cache)
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        generate_answers(model, tokenizer, prompts[:batch_size], eval_params, seed=0)  # warm-up / compile
        warmup_s = time.perf_counter() - started
        _, stats = generate_answers(model, tokenizer, prompts, eval_params, seed=0)
        row = {"batch_size": batch_size, "cache": cache, "warmup_s": round(warmup_s, 1), **stats,
               "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        log.info("%s", row)
        results["variants"].append(row)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| batch | cache | new tokens/s | warm-up s | peak GiB |\n| ---: | --- | ---: | ---: | ---: |")
    for row in results["variants"]:
        print(f"| {row['batch_size']} | {row['cache']} | {row['new_tokens_per_s']:,.0f} | {row['warmup_s']} | "
              f"{row['peak_allocated_gib']} |")


if __name__ == "__main__":
    main()
