#!/usr/bin/env bash
# Issue 26, item 4: Llama-3.1-8B- and Qwen3-8B-shaped random models side by side on one GPU, in
# about 9 minutes: unsloth training at the shipped recipe (4-bit, LoRA r=16 on the 7 projections,
# 12 rows x 1; steady tokens/s and peak memory) and the fast loop's answers at the evaluation's
# defaults (eval.batch_size auto, 256 new tokens; new tokens/s), then, time allowing, Qwen3's
# float32 answers against generate's (the CUDA-graph path of a family the CPU tests run eagerly).
#
#     OUT=/path/to/results bash benchmarks/families_gpu.sh
#
# Run from the repository root on the GPU host (Python 3.12, torch, transformers; the other packages
# from .gpu/gpu-site.tgz, unpacked here and put on PYTHONPATH; no network). Writes into $OUT:
# {llama,qwen3}-train.json (benchmarks/bench.py), {llama,qwen3}-generation.json
# (benchmarks/bench_generation.py), qwen3-float32.json, a .log beside each, and families.json, the
# numbers side by side. Each part has its own time limit, so one that fails or hangs leaves the
# others theirs (within BUDGET); the models are built in /tmp/llama8b and /tmp/qwen3-8b (16 GB
# each) by the training parts. Order: both trainings, then both generations (llama first in each
# pair; compare the two only as numbers from one machine, see benchmarks/README.md, Method).
set -u
: "${OUT:?set OUT to the results folder}"
BUDGET=${BUDGET:-540}  # seconds for all parts; the optional last part runs only if 150 are left
site=$(mktemp -d)
tar xzf .gpu/gpu-site.tgz -C "$site"
export PYTHONPATH=$PWD:$site/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

part() {  # NAME CAP RESERVE MODULE ARGS...: one benchmark, its log in $OUT/NAME.log, for at most CAP
  # seconds and never into the RESERVE seconds of BUDGET kept for the parts after it
  local name=$1 cap=$2 reserve=$3 module=$4 started=$SECONDS
  shift 4
  local limit=$((BUDGET - SECONDS - reserve))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 30 ]; then echo "$name: skipped, ${limit}s left for it"; return; fi
  timeout "$limit" python -m "benchmarks.$module" --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? after $((SECONDS - started))s of at most ${limit}s (${SECONDS}s in all)"
  tail -n 12 "$OUT/$name.log" | grep '^|'
}

# Training: build the model, 200 synthetic rows (160 for training), 7 steps (steady: steps 3-7).
part llama-train 210 330 bench --family llama --backends unsloth --skip-generation --skip-pipeline \
  --rows 200 --train-steps 7 --work-dir /tmp/bench-work-llama
part qwen3-train 210 180 bench --family qwen3 --backends unsloth --skip-generation --skip-pipeline \
  --rows 200 --train-steps 7 --work-dir /tmp/bench-work-qwen3
# Answers: 50 test questions at eval.batch_size auto and 256 new tokens, twice (cold, then warm),
# 128 questions, varied caps, and all but 24 GiB of the card held back (each written as it ends).
part llama-generation 100 90 bench_generation --family llama --only "fast, auto"
part qwen3-generation 100 0 bench_generation --family qwen3 --only "fast, auto"
left=$((BUDGET - SECONDS))
if [ "$left" -ge 150 ]; then
  part qwen3-float32 $((left - 10)) 0 bench_generation --family qwen3 --only float32
else
  echo "qwen3-float32: skipped, ${left}s left"
fi

python - "$OUT" <<'EOF'
"""families.json: training and answer speed of both families side by side, qwen3 / llama."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def read(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


summary = {"device": read("llama-train").get("environment", {}).get("device")}
for family in ("llama", "qwen3"):
    train = read(f"{family}-train").get("train", {}).get("unsloth", {})
    variants = {row["variant"]: row for row in read(f"{family}-generation").get("variants", [])}
    summary[family] = {
        "train": {key: train.get(key) for key in ("steady_tokens_per_s", "peak_gpu_memory_gib", "step_s", "mfu",
                                                  "steps", "error")},
        "answers": {name: {key: row.get(key) for key in ("decoder", "new_tokens_per_s", "batch_size",
                                                         "peak_allocated_gib", "error")}
                    for name, row in variants.items()},
    }
ratios = {}
llama_speed, qwen3_speed = (summary[family]["train"].get("steady_tokens_per_s") for family in ("llama", "qwen3"))
if llama_speed and qwen3_speed:
    ratios["train_steady_tokens_per_s"] = round(qwen3_speed / llama_speed, 3)
for name, row in summary["llama"]["answers"].items():
    other = summary["qwen3"]["answers"].get(name, {})
    if row.get("new_tokens_per_s") and other.get("new_tokens_per_s"):
        ratios[f"answers: {name}"] = round(other["new_tokens_per_s"] / row["new_tokens_per_s"], 3)
summary["qwen3_over_llama"] = ratios
summary["qwen3_float32_agreement"] = read("qwen3-float32").get("agreement_first_16")
(out / "families.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary["qwen3_over_llama"], indent=2))
EOF
echo "done after ${SECONDS}s"
