"""Resume on a GPU with the unsloth backend: a killed train stage, rerun, against an uninterrupted one.

    python -m benchmarks.resume_check --out RESULTS.json [--layers 2] [--steps 12]

The CPU tests compare resumed and uninterrupted runs byte for byte on the transformers backend;
unsloth replaces the Trainer's training loop with its own, so this checks the same promises on
the GPU path: the run is killed (SIGKILL) in the step after a checkpoint, rerun with
`python -m stages.train`, and its train loss, eval losses, token count and curves are compared
with an uninterrupted run's (GPU kernels are not bit-exact, so losses are compared to a
tolerance); a finished run must leave no checkpoint, and a forced rerun must start at step 1.
The model is a small Llama with random bf16 weights (4-bit on load), the data the shipped sample.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.run_stages import prepare_workspace, run_stages, stage_env
from tools.smoke import ROOT

# Holds the stage in the step after checkpoint-<at> (our own callback, which unsloth leaves alone).
HOLD = """
import os, time, unsloth  # unsloth first, as on every GPU run
from pathlib import Path
from stages import callbacks
at, marker = int(os.environ["HOLD_AT"]), Path(os.environ["HOLD_MARKER"])
original = callbacks.Throughput.on_step_end
def on_step_end(self, args, state, control, **kwargs):
    if state.global_step == at + 1:
        marker.touch(); time.sleep(600)
    return original(self, args, state, control, **kwargs)
callbacks.Throughput.on_step_end = on_step_end
from stages import train
train.main()
"""


def small_llama(out_dir: Path, layers: int) -> Path:
    import torch

    from tools.tiny_model import DEFAULT_DATA, build_model, build_tokenizer, corpus_from

    tokenizer = build_tokenizer(corpus_from(ROOT / DEFAULT_DATA))
    model = build_model(tokenizer, hidden_size=1024, intermediate_size=3584, layers=layers, heads=8, kv_heads=4)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def outputs(workspace: Path) -> dict:
    curves = {}
    for tsv in sorted((workspace / "dvclive/train/plots/metrics").rglob("*.tsv")):
        rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
        curves[tsv.name if "eval" not in str(tsv) else "eval_" + tsv.name] = [(int(s), float(v)) for s, v in rows]
    return {
        "metrics": json.loads((workspace / "metrics/train.json").read_text())["train"],
        "info": json.loads((workspace / "metrics/info/train.json").read_text()),
        "curves": curves,
        "checkpoints_left": (workspace / "models/checkpoints").exists(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "resume_check"
    shutil.rmtree(scratch, ignore_errors=True)
    model = small_llama(scratch / "model", args.layers)
    overrides = {"data.source": str(ROOT / "data/sample/pubmedqa_ko_sample.json"), "model.name": str(model),
                 "model.base_16bit": str(model), "model.backend": "unsloth", "model.max_seq_length": 1024,
                 "train.max_steps": args.steps, "train.save_steps": 4, "train.eval_steps": 4,
                 "train.per_device_train_batch_size": 4}
    env = stage_env()
    results = {}

    reference = scratch / "reference"
    prepare_workspace(reference, overrides)
    results["uninterrupted_s"] = sum(run_stages(reference, ["prepare", "train"]).values())
    results["uninterrupted"] = outputs(reference)

    resumed = scratch / "resumed"
    prepare_workspace(resumed, overrides)
    run_stages(resumed, ["prepare"])
    marker = resumed / ".held"
    process = subprocess.Popen([sys.executable, "-c", HOLD], cwd=resumed,
                               env={**env, "HOLD_AT": "4", "HOLD_MARKER": str(marker)})
    while not marker.exists():
        if process.poll() is not None:
            raise SystemExit("the held run ended before its hold point")
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    results["left_after_kill"] = sorted(p.name for p in (resumed / "models/checkpoints").iterdir())
    rerun = subprocess.run([sys.executable, "-m", "stages.train"], cwd=resumed, env=env, capture_output=True, text=True)
    results["rerun_exit"] = rerun.returncode
    results["rerun_log"] = [line for line in rerun.stderr.splitlines() if "resum" in line or "error" in line][:5]
    results["resumed"] = outputs(resumed)
    forced = subprocess.run([sys.executable, "-m", "stages.train"], cwd=resumed, env=env, capture_output=True, text=True)
    results["forced_rerun_starts_at_step_1"] = f"step 1/{args.steps}  loss" in forced.stderr and "resuming" not in forced.stderr
    a, b = results["uninterrupted"], results["resumed"]
    results["max_abs_loss_difference"] = max(abs(a["metrics"][k] - b["metrics"][k]) for k in a["metrics"])
    results["same_steps_tokens"] = (a["info"]["steps"], a["info"]["tokens_seen"]) == (b["info"]["steps"], b["info"]["tokens_seen"])
    results["same_curve_steps"] = {k: [s for s, _ in v] for k, v in a["curves"].items()} == \
        {k: [s for s, _ in v] for k, v in b["curves"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("uninterrupted", "resumed")}, indent=2))


if __name__ == "__main__":
    main()
