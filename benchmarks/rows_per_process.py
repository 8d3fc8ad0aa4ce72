"""Each process's tokens at every optimizer step of bench_parallel's runs, reproduced on the CPU.

    python -m benchmarks.rows_per_process --out R.json [--processes 2] [--per-device 6] [--steps 24]
        [--gpu-log train.log ...]

bench_parallel trains the 8B-shaped model (benchmarks/random_llama.py) on 500 synthetic rows
tokenised by tools/tiny_model's tokenizer. The tiny test model has that same tokenizer, so the train
stage run here on the CPU, with the same data, params and seed, deals the same rows to the same
processes at every step: the step totals agree with the GPU logs' to the token (checked on
2026-11-26). Each process records its rows' non-padding lengths (padding-free on the GPU, a process
trains on their sum). Per step this writes each process's tokens, and which processes hold more
tokens than at any step before (a new high-water mark), beside the step seconds of GPU runs' logs
(`--gpu-log`, rank 0's train.log of a bench_parallel run with the same processes and rows per
device and one forward pass per step). A log whose step totals differ from the replay's is refused:
its run had other data or params. Only the totals can be checked so; the split between processes
follows from the same sampler and is not in the GPU logs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

RECORD = "BENCH_RECORD_ROWS"  # set: this module is the train stage, recording its rows
ROWS_FILE = "rows-rank{rank}.jsonl"


def record_rows() -> None:
    """Wrap the Trainer's token count, which sees every batch of this process, to write its rows' lengths."""
    from transformers import Trainer

    track, rank = Trainer._track_num_input_tokens, int(os.environ.get("RANK", "0"))

    def track_and_record(self, inputs):
        mask = inputs.get("attention_mask")
        if mask is None:  # the CPU replay pads each batch and masks the padding; anything else is not replayed
            raise RuntimeError("rows_per_process: a batch without an attention mask")
        lengths = mask.sum(dim=1).tolist()
        with open(ROWS_FILE.format(rank=rank), "a", encoding="utf-8") as out:
            out.write(json.dumps({"step": self.state.global_step + 1, "lengths": lengths}) + "\n")
        return track(self, inputs)

    Trainer._track_num_input_tokens = track_and_record


def tokens_per_process(workspace: Path, processes: int) -> dict[int, list[int]]:
    """{step: [tokens of each process]}, from the rows files (the forward passes of a step summed)."""
    steps: dict[int, list[int]] = {}
    for rank in range(processes):
        for line in (workspace / ROWS_FILE.format(rank=rank)).read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], [0] * processes)[rank] += sum(entry["lengths"])
    return dict(sorted(steps.items()))


def new_highs(per_step: dict[int, list[int]]) -> dict[int, list[int]]:
    """{step: the processes that hold more tokens than at any earlier step} (the first step: all)."""
    highest, marks = None, {}
    for step, tokens in per_step.items():
        highest = highest or [0] * len(tokens)
        marks[step] = [rank for rank, count in enumerate(tokens) if count > highest[rank]]
        highest = [max(h, count) for h, count in zip(highest, tokens)]
    return marks


def gpu_seconds(per_step: dict[int, list[int]], logs: dict[str, list[dict]]) -> dict[int, list[float | None]]:
    """{step: each GPU log's seconds for it}; a log whose tokens at some step differ from the replay's is refused."""
    for name, steps in logs.items():
        for entry in steps:
            replayed = sum(per_step.get(entry["step"], [0]))
            if entry["tokens"] != replayed:
                raise SystemExit(f"{name}: step {entry['step']} trained {entry['tokens']:,} tokens, the replay "
                                 f"{replayed:,}: that run had other data, rows per device or params")
    by_log = [{entry["step"]: entry["seconds"] for entry in steps} for steps in logs.values()]
    return {step: [seconds.get(step) for seconds in by_log] for step in per_step}


def main() -> None:
    if os.environ.get(RECORD):
        from benchmarks.probe_train import run_stage_as

        run_stage_as("benchmarks.rows_per_process", record_rows)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--per-device", type=int, default=6, help="rows per process and forward pass")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--gpu-log", type=Path, nargs="*", default=[], help="GPU runs' train.log, for step seconds")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "rows-per-process")
    args = parser.parse_args()

    from benchmarks.bench_parallel import step_times, synthetic_data, variant_params
    from benchmarks.run_stages import prepare_workspace, run_stages
    from stages.outputs import write_json
    from tools.smoke import ROOT
    from tools.tiny_model import build_tiny_model

    out, logs, work = args.out.resolve(), [log.resolve() for log in args.gpu_log], args.work_dir.resolve()
    model = work / "tiny-model"
    shutil.rmtree(model, ignore_errors=True)  # built afresh: the tokenizer must be this checkout's
    build_tiny_model(model)
    os.chdir(ROOT)  # synthetic_data reads the sample data from the checkout
    common, _ = synthetic_data(work, model, args.rows)
    workspace = work / f"{args.processes}x{args.per_device}"
    shutil.rmtree(workspace, ignore_errors=True)  # no rows or checkpoint of an earlier run
    # bench_parallel's params, on the CPU; one forward pass a step, as unsloth's offload slots hold one
    prepare_workspace(workspace, variant_params({**common, "model.load_in_4bit": False}, "transformers",
                                                args.processes, args.per_device, args.steps))
    run_stages(workspace, ["prepare"], workspace / "prepare.log")
    os.environ[RECORD] = "1"
    run_stages(workspace, ["benchmarks.rows_per_process"], workspace / "train.log")  # exits if the stage fails
    per_step = tokens_per_process(workspace, args.processes)
    seconds = gpu_seconds(per_step, {str(log): step_times(log)["steps"] for log in logs})
    highs = new_highs(per_step)
    steps = [{"step": step, "tokens": sum(tokens), "per_process": tokens, "new_high": highs[step],
              "gpu_seconds": seconds[step]} for step, tokens in per_step.items()]
    write_json(out, {"processes": args.processes, "per_device": args.per_device, "rows": args.rows,
                     "gpu_logs": [str(log) for log in logs], "steps": steps})
    for entry in steps:
        print(f"step {entry['step']:3d}: {entry['tokens']:6,} tokens, per process "
              f"{' / '.join(f'{t:,}' for t in entry['per_process'])}"
              f"{'  new high: ' + ', '.join(map(str, entry['new_high'])) if entry['new_high'] else ''}"
              f"{'  GPU s: ' + ' '.join(str(s) for s in entry['gpu_seconds']) if logs else ''}")

if __name__ == "__main__":
    main()
