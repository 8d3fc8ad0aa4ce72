"""The train stage, profiled: where each process's step time goes (benchmarks/bench_parallel.py --probe).

    python -m benchmarks.probe_train        (in a workspace, instead of python -m stages.train)

Runs stages.train unchanged, in every process (a several-process run relaunches this module, not
the stage), with three additions, written to probe-rank<R>.json in the workspace:

- per optimizer step: wall seconds, graphs torch.compile built anew (dynamo's unique_graphs) and
  Triton kernels compiled in that step: a step slowed by compiling shows here;
- torch.profiler over steps PROBE_FIRST..PROBE_LAST (env, default 10..12): the share of the wall
  time the GPU ran any kernel or copy, and kernel time by kind (matmul, attention, NCCL, copies,
  the rest), per step. A DDP rank that waits for the other shows as idle GPU or NCCL time;
- torch's recompile log (as TORCH_LOGS=recompiles), so the log names what made torch.compile recompile.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stages import launch
from stages import train as train_stage

KINDS = (("nccl", ("nccl",)), ("copy", ("memcpy", "memset")), ("attention", ("flash", "fmha", "attn")),
         ("matmul", ("gemm", "cutlass", "sm90", "xmma", "matmul", "cublas", "nvjet")))


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KINDS if any(mark in lowered for mark in marks)), "other")


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, seconds out)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1e6


class Probe:
    """A TrainerCallback's methods; made one (probe()) only after the stage has imported unsloth."""

    def __init__(self):
        self.first = int(os.environ.get("PROBE_FIRST", "10"))
        self.last = int(os.environ.get("PROBE_LAST", "12"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.steps, self.profile, self.profiler = [], {}, None
        self.compiled = 0
        self._began = self._graphs = self._triton = 0

    @staticmethod
    def unique_graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            from triton import knobs

            def count(**_kwargs):
                self.compiled += 1

            knobs.runtime.jit_post_compile_hook = count
        except (ImportError, AttributeError):
            pass

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        step = state.global_step + 1
        if step == self.first:
            synchronize()
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
            self.window = time.perf_counter()
        self._began, self._graphs, self._triton = time.perf_counter(), self.unique_graphs(), self.compiled

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.profiler is not None and step == self.last:
            synchronize()
            wall = time.perf_counter() - self.window
            self.profiler.__exit__(None, None, None)
            try:
                self.profile = self.summary(wall, self.last - self.first + 1)
            except Exception as exc:  # a diagnostic: never the reason a run fails
                self.profile = {"error": f"{type(exc).__name__}: {exc}"}
            self.profiler = None
        self.steps.append({"step": step, "seconds": round(time.perf_counter() - self._began, 4),
                           "new_graphs": self.unique_graphs() - self._graphs,
                           "triton_compiles": self.compiled - self._triton})

    def summary(self, wall: float, steps: int) -> dict:
        intervals, by_kind = [], {}
        for event in self.profiler.events():
            if str(getattr(event, "device_type", "")).endswith("CUDA") and event.time_range.elapsed_us() > 0:
                intervals.append((event.time_range.start, event.time_range.end))
                kind = kind_of(event.name)
                by_kind[kind] = by_kind.get(kind, 0.0) + event.time_range.elapsed_us() / 1e6
        busy = busy_seconds(intervals)
        top = sorted(self.profiler.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)[:15]
        return {
            "top_kernels": [[e.key[:90], round(e.self_device_time_total / 1e6 / steps, 4), e.count // steps]
                            for e in top if e.self_device_time_total > 0],"steps": steps, "wall_s_per_step": round(wall / steps, 4),
                "gpu_busy_s_per_step": round(busy / steps, 4), "gpu_busy_share": round(busy / wall, 4),
                "kernel_s_per_step": {k: round(v / steps, 4) for k, v in sorted(by_kind.items())}}

    def on_train_end(self, args, state, control, **kwargs):
        Path(f"probe-rank{self.rank}.json").write_text(
            json.dumps({"rank": self.rank, "profile": self.profile, "steps": self.steps}, indent=1) + "\n")


def run_stage_as(module: str, after_load=None) -> None:
    """stages.train in this process, unchanged but for after_load() (if any), called once the model is loaded.

    By then unsloth (when used) is imported, so transformers and trl may be too. A several-process
    run relaunches `module` instead of the stage, so every process runs the same wrapper.
    """
    relaunch, load = launch.launch, train_stage.load_for_training

    def launch_module(num_processes, config_file, backend, _module="stages.train"):
        return relaunch(num_processes, config_file, backend, module)

    def load_then(*args, **kwargs):
        loaded = load(*args, **kwargs)
        if after_load is not None:
            after_load()
        return loaded

    launch.launch, train_stage.load_for_training = launch_module, load_then
    train_stage.main()


def add_probe() -> None:
    from transformers import TrainerCallback

    from stages import callbacks

    quiet = callbacks.quiet_progress

    def quiet_and_probe(trainer):
        quiet(trainer)
        trainer.add_callback(type("ProbeCallback", (Probe, TrainerCallback), {})())

    callbacks.quiet_progress = quiet_and_probe


def main() -> None:
    import torch

    torch._logging.set_logs(recompiles=True)
    run_stage_as("benchmarks.probe_train", add_probe)


if __name__ == "__main__":
    main()
