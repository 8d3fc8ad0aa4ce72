"""The several-GPU benchmark's own arithmetic, on the CPU: what it reads from the train stage's log
and how it orders and compares runs. Its GPU numbers (benchmarks/README.md) are only as right as these."""

import logging

import pytest
import torch
from transformers import TrainerState

from benchmarks.bench_parallel import (cosine, late_tokens_per_s, mean_by_part, parts_to_run, ratios, rounds,
                                      step_times, warmup_parts)
from stages import callbacks


def test_the_benchmark_reads_each_steps_tokens_and_seconds_from_the_stage_log(tmp_path, caplog, monkeypatch):
    clock = iter([100.0, 101.25, 101.75])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    line, state = callbacks.LogLine(), TrainerState(max_steps=3, is_world_process_zero=True)
    with caplog.at_level(logging.INFO, logger="stages.train"):
        for step, seen in ((1, 12_000), (2, 24_500), (3, 30_750)):
            state.global_step, state.num_input_tokens_seen = step, seen
            line.on_log(None, state, None, logs={"loss": 2.0, "learning_rate": 1e-4, "grad_norm": 0.5})
    log_file = tmp_path / "train.log"
    log_file.write_text("\n".join(record.getMessage() for record in caplog.records) + "\n", encoding="utf-8")
    # step 1 has no rate (nothing before it); then 12,500 tokens in 1.25 s and 6,250 in 0.5 s
    assert step_times(log_file)["steps"] == [{"step": 2, "seconds": 1.25, "tokens": 12_500},
                                             {"step": 3, "seconds": 0.5, "tokens": 6_250}]
    assert "10,000 tokens/s (12,500 tokens in 1.250 s)" in caplog.records[1].getMessage()


def test_only_picks_parts_and_they_keep_the_plan_order():
    plan = [("one", {"a": 1}), ("merge", None), ("two", {"a": 2})]
    assert parts_to_run(plan, None) == plan
    assert parts_to_run(plan, ["two", "one"]) == [("one", {"a": 1}), ("two", {"a": 2})]
    assert parts_to_run(plan, []) == []


def test_late_speed_takes_only_the_log_windows_that_start_after_the_early_steps():
    every_step = [{"step": s, "tokens": 1000, "seconds": 2.0 if s <= 10 else 0.5} for s in range(2, 21)]
    assert late_tokens_per_s(every_step, 1) == 2000  # steps 11-20: 10,000 tokens in 5 s
    # logging every 10 steps: the line at 20 covers 11-20, the forced last one at 25 covers 21-25
    every_10 = [{"step": 20, "tokens": 10_000, "seconds": 5.0}, {"step": 25, "tokens": 5000, "seconds": 2.5}]
    assert late_tokens_per_s([{"step": 10, "tokens": 9000, "seconds": 30.0}, *every_10], 10) == 2000
    assert late_tokens_per_s(every_step[:5], 1) is None  # nothing after step 10


def test_the_warm_up_trains_once_per_process_count_and_rounds_alternate_their_order():
    def shape(backend, processes, rows):
        return {"model.backend": backend, "train.num_processes": processes, "train.per_device_train_batch_size": rows}

    one, two = shape("unsloth", 1, 12), shape("unsloth", 2, 6)
    parts = [("a-1", one), ("a-2", two), ("merge", None), ("t-2", shape("transformers", 2, 6)),
             ("c-2", shape("unsloth", 2, 12)), ("b-1", {**one, "train.gradient_accumulation_steps": 2})]
    # one run per shape the kernels see: backend, processes, rows per device
    assert [name for name, _ in warmup_parts(parts)] == ["a-1", "a-2", "t-2", "c-2"]
    assert warmup_parts([("merge", None)]) == []
    assert [[name for name, _ in round_parts] for _, round_parts in rounds(parts[:3], 3)] == [
        ["a-1", "a-2", "merge"], ["merge", "a-2", "a-1"], ["a-1", "a-2", "merge"]]


def test_speedups_compare_each_parts_mean_over_its_rounds_and_skip_failed_runs():
    train = {"one": {"steady": 100.0}, "two": {"steady": 170.0}, "one#2": {"steady": 110.0},
             "two#2": {"steady": 190.0}, "two#3": {"error": "CUDA out of memory"}, "three": {"error": "x"}}
    means = mean_by_part(train, "steady")
    assert means == {"one": 105.0, "two": 180.0}
    assert ratios(means, [("two", "one"), ("three", "one")]) == {"two / one": round(180 / 105, 3)}


def test_the_adapter_check_cosine_stays_a_cosine_over_tens_of_millions_of_weights():
    # In float32, torch's cosine_similarity over an adapter-sized vector came out at 1.0097 on the GPU.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20_000_000, generator=generator) * 1e-3
    y = x + torch.randn(20_000_000, generator=generator) * 1e-4
    expected = 1 / (1 + 0.1 ** 2) ** 0.5  # y's noise is a tenth of x: cos = 1 / sqrt(1.01)
    assert cosine(x, y) == pytest.approx(expected, abs=1e-4) and cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cosine(x, -x) == pytest.approx(-1.0, abs=1e-12)
