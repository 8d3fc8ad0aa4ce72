"""Generation speed of the evaluate stage's own code: transformers' generate against the fast loop.

    python -m benchmarks.bench_generation --out RESULTS.json [--family llama|qwen3] [--model-dir DIR] [--prompts 50]

Builds the random 8B-shaped model of --family (benchmarks/random_model.py: Llama-3.1-8B or
Qwen3-8B, in /tmp/llama8b or /tmp/qwen3-8b by default) when --model-dir holds none, renders --prompts
synthetic test questions (300-1,600 tokens, as benchmarks/bench.py makes them) with the
pipeline's chat, and times stages.evaluation.generate_answers on the bf16 model, variant after
variant in one process. New tokens/s counts tokens kept (up to the end of turn), as
metrics/cost/evaluate.json does; warm-up (buffers, CUDA graph capture) is inside the timed call.
Answers are compared with transformers' generate (the reference variant) token for token.

A random model never ends an answer, so the "varied" variants give each prompt a cap drawn from
40-256 tokens (seeded), as real answers end at varied lengths: continuous batching (a finished
answer's slot takes the next prompt) against static batches (slots refilled only when all are free).
--card-gib 24 then holds back all but 24 GiB of the card and runs `eval.batch_size: auto`,
the budget of an RTX 3090/4090.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import sys
import time
from pathlib import Path

from benchmarks.bench import environment, synthetic_records
from benchmarks.random_model import MODEL_DIRS, SHAPES
from stages.params import EvalParams
from stages.prompt import build_messages, render_prompt

log = logging.getLogger("benchmarks.bench_generation")
GIB = 2**30


def prompts_for(model_dir: Path, n_prompts: int, tokenizer, system: str) -> list[str]:
    records, _ = synthetic_records(model_dir, n_prompts)
    return [render_prompt(tokenizer, build_messages(system, r["QUESTION"], r["CONTEXTS"], True)) for r in records]


def same_share(answers: list[str], reference: list[str]) -> dict:
    """How many answers equal the reference's, and where the others first differ (in characters)."""
    same = sum(a == r for a, r in zip(answers, reference))
    first_diff = [next((k for k, (x, y) in enumerate(zip(a, r)) if x != y), min(len(a), len(r)))
                  for a, r in zip(answers, reference) if a != r]
    return {"identical": same, "of": len(reference), "first_difference_at_chars": sorted(first_diff)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--family", choices=sorted(SHAPES), default="llama", help="the 8B shape of a model built now")
    parser.add_argument("--model-dir", type=Path, help="built here when it has no config.json "
                        f"(default: {', '.join(f'{k} {v}' for k, v in MODEL_DIRS.items())})")
    parser.add_argument("--layers", type=int, help="decoder layers of a model built now (default: the family's)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--many", type=int, default=128, help="prompts of the large-batch variant")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--card-gib", type=float, default=24.0)
    parser.add_argument("--only", nargs="*", metavar="WORD", help="run only the parts whose names contain a WORD")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from benchmarks.random_model import build
    from stages.decoding import SlotDecoder
    from stages.evaluation import generate_answers
    from stages.modeling import load_for_inference, load_tokenizer
    from stages.params import load_params

    args.model_dir = args.model_dir or MODEL_DIRS[args.family]
    if not (args.model_dir / "config.json").exists():
        build(args.model_dir, args.layers, family=args.family)
        torch.cuda.empty_cache()
    tokenizer = load_tokenizer(str(args.model_dir))
    model = load_for_inference(str(args.model_dir), "model")
    prompts = prompts_for(args.model_dir, max(args.prompts, args.many), tokenizer, load_params().prompt.system)
    test = prompts[:args.prompts]
    caps = [random.Random(i).randint(40, args.max_new_tokens) for i in range(len(test))]
    results = {"environment": {**environment("cuda"), "command": shlex.join(["python", "-m", __spec__.name, *sys.argv[1:]])},
               "family": args.family, "model_type": model.config.model_type, "prompts": len(test), "variants": []}
    first16 = {}  # variant -> answers to the first 16 prompts, for the agreement table

    def measure(model, items, eval_params, caps_, continuous):
        if continuous:
            return generate_answers(model, tokenizer, items, eval_params, 0, caps_)
        original = SlotDecoder.run  # the same loop and stage code, with static batches
        SlotDecoder.run = lambda self, *a, **k: original(self, *a, **{**k, "continuous": False})
        try:
            return generate_answers(model, tokenizer, items, eval_params, 0, caps_)
        finally:
            SlotDecoder.run = original

    def run(name, items, batch_size, decoder="fast", caps_=None, continuous=True, ballast=0, model=model,
            max_new_tokens=args.max_new_tokens):
        eval_params = EvalParams(batch_size=batch_size, max_new_tokens=max_new_tokens, decoder=decoder)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            answers, stats = measure(model, items, eval_params, caps_, continuous)
        except Exception as exc:  # noqa: BLE001 - recorded, and the other variants still run
            log.exception("%s failed", name)
            results["variants"].append({"variant": name, "prompts": len(items), "error": f"{type(exc).__name__}: {exc}"})
            torch.cuda.empty_cache()
            return
        seconds = time.perf_counter() - started
        row = {"variant": name, "prompts": len(items), "seconds": round(seconds, 2),
               **{k: v for k, v in stats.items() if k != "cut_off"},
               "peak_allocated_gib": round((torch.cuda.max_memory_allocated() - ballast) / GIB, 2)}
        first16[name] = answers[:16]
        log.info("%s", row)
        results["variants"].append(row)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    def part(name):  # --only: the parts whose names contain one of the given words
        return args.only is None or any(word in name for word in args.only)

    bf16 = [("generate, batch 16 (the old default)", test[:16], 16, "generate", {}),
            ("generate, batch 50", test, 50, "generate", {}),
            ("fast, 16 at once", test, 16, "fast", {}),
            ("fast, auto", test, "auto", "fast", {}),
            ("fast, auto, again (warm)", test, "auto", "fast", {}),
            (f"fast, auto, {args.many} prompts", prompts[:args.many], "auto", "fast", {}),
            ("varied caps: fast, 16 at once, static batches", test, 16, "fast", {"caps_": caps, "continuous": False}),
            ("varied caps: fast, 16 at once, continuous", test, 16, "fast", {"caps_": caps}),
            ("varied caps: fast, auto", test, "auto", "fast", {"caps_": caps})]
    for name, items, batch_size, decoder, extra in bf16:
        if part(name):
            run(name, items, batch_size, decoder, **extra)
    name = f"fast, auto, {args.card_gib:g} GiB card"
    if part(name):
        _, total = torch.cuda.mem_get_info()
        held = int(total - args.card_gib * GIB)  # all but card-gib of the card, in this process: one CUDA context
        ballast = torch.empty(held, dtype=torch.uint8, device="cuda")
        results["card_gib"] = args.card_gib
        run(name, test, "auto", ballast=held)
        del ballast
    # float32: where bf16 rounding no longer decides between near-equal logits of a random model
    if part("float32"):
        del model
        torch.cuda.empty_cache()
        fp32 = load_for_inference(str(args.model_dir), "model", dtype=torch.float32)
        short = [min(cap, 64) for cap in caps[:16]]
        run("float32: generate, batch 16", test[:16], 16, "generate", model=fp32, max_new_tokens=64)
        run("float32: fast, 16 at once", test[:16], 16, model=fp32, max_new_tokens=64)
        # fewer slots than questions and answers of varied length: slots refilled between graph replays
        run("float32, varied caps: generate, batch 16", test[:16], 16, "generate", caps_=short, model=fp32,
            max_new_tokens=64)
        run("float32, varied caps: fast, 5 at once", test[:16], 5, caps_=short, model=fp32, max_new_tokens=64)
    results["agreement_first_16"] = {
        f"{a} | {b}": same_share(first16[a], first16[b])
        for a, b in [("generate, batch 16 (the old default)", "generate, batch 50"),
                     ("generate, batch 16 (the old default)", "fast, 16 at once"),
                     ("generate, batch 16 (the old default)", "fast, auto"),
                     ("fast, 16 at once", "fast, auto"),
                     ("float32: generate, batch 16", "float32: fast, 16 at once"),
                     ("float32, varied caps: generate, batch 16", "float32, varied caps: fast, 5 at once")]
        if a in first16 and b in first16}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for pair, share in results["agreement_first_16"].items():
        print(f"{pair}: {share['identical']}/{share['of']} identical, first differences at characters "
              f"{share['first_difference_at_chars']}")
    print("| variant | prompts | at once | new tokens/s | warm-up s | peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in results["variants"]:
        if "error" in row:
            print(f"| {row['variant']} | {row['prompts']} | failed: {row['error']} |")
            continue
        print(f"| {row['variant']} | {row['prompts']} | {row['batch_size']} | {row['new_tokens_per_s']:,.0f} | "
              f"{row['warmup_s']} | {row['peak_allocated_gib']} |")


if __name__ == "__main__":
    main()
