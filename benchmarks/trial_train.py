"""The train stage with one change under trial (bench_parallel), chosen by environment variables.

    python -m benchmarks.trial_train        (in a workspace, instead of python -m stages.train)

BENCH_CUDNN_SDP=1: attention on cuDNN again, as the stage ran it before 2026-11-26. On H100 / H200
torch's scaled_dot_product_attention picks cuDNN for training, which builds a plan for every new
sequence length (unsloth pads each row to a multiple of 128 to bound them): ~170 ms the first time a
batch holds a row of a new length bucket, on each process separately. The stage now turns it off
for unsloth (stages.unsloth_runtime.train_attention_without_cudnn); this is the comparison that rests on.

BENCH_EXACT_SLOTS=1: unsloth's offload host slots sized as unsloth_zoo sizes them, as the stage ran
them before 2026-11-26. Each layer's slot is sized to the largest activation so far and grows, by a
resize_ that takes a new pinned block and copies the old contents, whenever a process meets more
tokens than at any step before: the slow steps of benchmarks/rows_per_process.py. The stage now
asks for the whole pinned block torch allocates anyway (stages.unsloth_runtime
.offload_slots_in_whole_pinned_blocks); this is the comparison that rests on.

BENCH_TIME_HOST_SLOTS=1: each creation and growth of one of those host slots is timed and logged
("benchmark trial: host slot ..."), so bench_parallel can say how much of each step it took.

BENCH_NO_STEP_SYNC=1: no waits for the GPU inside a step.

transformers 5.17's training loop makes the host wait for the GPU twice right after every
backward pass: `logging_nan_inf_filter` tests the loss with `torch.isnan(...)` in an `if`, and
`include_num_input_tokens_seen` gathers the step's token count across processes and reads it with
`.item()`. While the host waits, it queues nothing, so the optimizer step and the next batch start
on an idle GPU. This runs stages.train unchanged except:

- logging_nan_inf_filter off (the loss is added as it is; a NaN then shows in the log, not hidden);
- the token count gathered on the GPU and read only when the Trainer logs (it waits there anyway).

train.logging_steps is a param: the logging wait itself is removed by a variant that logs every
10 steps. state.num_input_tokens_seen is exact at every logging step and may lag between them, so
only the log lines' rates (what bench_parallel reads) are meaningful, not the stage's
steady_tokens_per_s.
"""

from __future__ import annotations

from benchmarks.probe_train import run_stage_as
from stages import train as train_stage
from stages import unsloth_runtime


def defer_token_count() -> None:
    import torch
    from transformers import Trainer

    logged = Trainer._maybe_log_save_evaluate

    def track(self, inputs):
        if self.args.include_num_input_tokens_seen == "no":
            return
        if self.args.include_num_input_tokens_seen == "non_padding" and "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif self.args.include_num_input_tokens_seen == "non_padding":
            count = (inputs["input_ids"] != self.processing_class.pad_token_id).sum()
        else:
            count = inputs["input_ids"].numel()
        count = self.accelerator.gather(torch.as_tensor(count, device=self.args.device, dtype=torch.int64)).sum()
        pending = getattr(self, "_tokens_pending", None)
        self._tokens_pending = count if pending is None else pending + count

    def log_save_evaluate(self, *args, **kwargs):
        pending = getattr(self, "_tokens_pending", None)
        if pending is not None and self.control.should_log:
            self.state.num_input_tokens_seen += int(pending.item())
            self._tokens_pending = None
        return logged(self, *args, **kwargs)

    Trainer._track_num_input_tokens, Trainer._maybe_log_save_evaluate = track, log_save_evaluate


def time_host_slots(module=None) -> None:
    """Log how long each of unsloth_zoo's offload host slots takes to be made or grown (BENCH_TIME_HOST_SLOTS)."""
    import os
    import time

    if module is None:
        from unsloth_zoo import gradient_checkpointing as module
    rank, mib = os.environ.get("LOCAL_RANK", "0"), 1 << 20

    def timed(function, what):
        def call(*args):
            before = args[0].untyped_storage().nbytes() if what == "grown" else 0  # resize_ grows it in place
            start = time.perf_counter()
            buffer = function(*args)
            print(f"benchmark trial: host slot rank {rank} {what} {before / mib:.1f} -> "
                  f"{buffer.untyped_storage().nbytes() / mib:.1f} MiB in {(time.perf_counter() - start) * 1000:.2f} ms",
                  flush=True)
            return buffer
        return call

    module._new_host_buffer = timed(module._new_host_buffer, "new")
    module._grow_host_buffer = timed(module._grow_host_buffer, "grown")
    print("benchmark trial: unsloth's offload host slots timed", flush=True)


def main() -> None:
    import os

    def cudnn_again() -> None:
        import torch

        torch.backends.cuda.enable_cudnn_sdp(True)
        print("benchmark trial: cuDNN attention back on", flush=True)

    steps = [cudnn_again] if os.environ.get("BENCH_CUDNN_SDP") else []
    if os.environ.get("BENCH_EXACT_SLOTS"):  # before the model loads: the stage then leaves the slots alone
        unsloth_runtime.offload_slots_in_whole_pinned_blocks = lambda module=None: False
        print("benchmark trial: unsloth's offload host slots sized as unsloth_zoo sizes them", flush=True)
    if os.environ.get("BENCH_TIME_HOST_SLOTS"):
        steps.append(time_host_slots)  # after the model loads: the time includes the stage's sizing
    if os.environ.get("BENCH_NO_STEP_SYNC"):
        configure = train_stage.sft_config

        def without_nan_filter(*args, **kwargs):
            config = configure(*args, **kwargs)
            config.logging_nan_inf_filter = False
            return config

        train_stage.sft_config = without_nan_filter
        steps.append(defer_token_count)

    def after_load() -> None:
        for step in steps:
            step()

    run_stage_as("benchmarks.trial_train", after_load)


if __name__ == "__main__":
    main()
