"""The several-GPU benchmark's own arithmetic, on the CPU: what it reads from the train stage's log
and how it splits step time. Its GPU numbers (benchmarks/README.md) are only as right as these."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from transformers import TrainerState

from benchmarks import rows_per_process, trial_train
from benchmarks.bench_parallel import (cosine, host_slot_times, late_tokens_per_s, mean_by_part, parts_to_run,
                                      ratios, rounds, step_fit, step_times, warmup_parts)
from benchmarks.probe_train import busy_seconds, kind_of
from conftest import offload_helpers
from stages import callbacks, unsloth_runtime
from tools.smoke import ROOT


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


def test_step_fit_separates_fixed_time_from_time_per_token_and_skips_the_first_steps():
    tokens = [9000, 7000, 12_000, 6000, 14_000, 10_000, 8000, 11_000]
    steps = [{"step": i + 1, "tokens": n, "seconds": 0.09 + n * 0.0001} for i, n in enumerate(tokens)]
    steps[0]["seconds"] = steps[1]["seconds"] = 30.0  # compiling: left out of the fit
    fit = step_fit(steps)
    assert fit["fitted_steps"] == 6
    assert fit["fixed_s_per_step"] == pytest.approx(0.09, abs=1e-4)
    assert fit["ms_per_1k_tokens"] == pytest.approx(100.0, abs=0.01)
    rates = sorted(n / (0.09 + n * 0.0001) for n in tokens[2:])
    assert fit["median_step_tokens_per_s"] == round((rates[2] + rates[3]) / 2)
    assert step_fit(steps[:4]) == {}  # too few steps to fit


def test_gpu_busy_time_counts_overlapping_kernels_once():
    # microseconds: two streams overlapping, a gap, a kernel inside another
    assert busy_seconds([(0, 400_000), (300_000, 500_000), (700_000, 900_000), (750_000, 800_000)]) == 0.7
    assert busy_seconds([]) == 0.0
    assert [kind_of(name) for name in ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "Memcpy DtoH (Device -> Pinned)",
                                       "nvjet_sm90_tst_256x160_64x4_1x2_h_bz_coopA_TNT", "flash_fwd_kernel",
                                       "triton_red_fused_rms_norm_0")] == [
        "nccl", "copy", "matmul", "attention", "other"]


def test_trials_run_only_when_named_and_parts_keep_the_plan_order():
    plan = [("one", {"a": 1}, {}, False), ("two", {"a": 2}, {}, False), ("two-trial", {"a": 2}, {"X": "1"}, True)]
    assert [name for name, _, _ in parts_to_run(plan, None)] == ["one", "two"]
    assert parts_to_run(plan, ["two-trial", "one"]) == [("one", {"a": 1}, {}), ("two-trial", {"a": 2}, {"X": "1"})]
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
    parts = [("copy_bandwidth", None, {}), ("a-1", one, {}), ("a-2", two, {}), ("b-1", one, {"X": "1"}),
             ("merge", None, {}), ("b-2", two, {"X": "1"}), ("c-2", shape("unsloth", 2, 12), {}),
             ("t-2", shape("transformers", 2, 6), {})]
    # one run per shape the kernels see: backend, processes, rows per device
    assert [name for name, _, _ in warmup_parts(parts)] == ["a-1", "a-2", "c-2", "t-2"]
    assert warmup_parts([("merge", None, {})]) == []
    assert [[name for name, _, _ in round_parts] for _, round_parts in rounds(parts[1:4], 3)] == [
        ["a-1", "a-2", "b-1"], ["b-1", "a-2", "a-1"], ["a-1", "a-2", "b-1"]]


def test_speedups_compare_each_parts_mean_over_its_rounds_and_skip_failed_runs():
    train = {"one": {"steady": 100.0}, "two": {"steady": 170.0}, "one#2": {"steady": 110.0},
             "two#2": {"steady": 190.0}, "two#3": {"error": "CUDA out of memory"}, "three": {"error": "x"}}
    means = mean_by_part(train, "steady")
    assert means == {"one": 105.0, "two": 180.0}
    assert ratios(means, [("two", "one"), ("three", "one")]) == {"two / one": round(180 / 105, 3)}


def test_rows_per_process_marks_each_processes_new_high_water_mark(tmp_path):
    for rank, rows in ((0, [[3, 4], [5], [9], [2], [1, 1]]), (1, [[6], [7], [8], [9], [9]])):
        (tmp_path / rows_per_process.ROWS_FILE.format(rank=rank)).write_text(
            "".join(json.dumps({"step": step, "lengths": lengths}) + "\n"
                    for step, lengths in zip((1, 1, 2, 3, 5), rows)), encoding="utf-8")  # step 1: two passes
    per_step = rows_per_process.tokens_per_process(tmp_path, 2)
    assert per_step == {1: [12, 13], 2: [9, 8], 3: [2, 9], 5: [2, 9]}  # a step's number is kept, not recounted
    assert rows_per_process.new_highs(per_step) == {1: [0, 1], 2: [], 3: [], 5: []}
    assert rows_per_process.new_highs({1: [5, 5], 2: [6, 4], 3: [6, 7], 4: [7, 7]}) == {1: [0, 1], 2: [0], 3: [1],
                                                                                         4: [0]}


def test_rows_per_process_pairs_gpu_seconds_only_with_a_log_of_the_same_rows():
    per_step = {1: [5, 6], 2: [7, 4], 3: [6, 6]}
    same = [{"step": 2, "tokens": 11, "seconds": 0.9}, {"step": 3, "tokens": 12, "seconds": 0.6}]
    assert rows_per_process.gpu_seconds(per_step, {"a": same, "b": same[1:]}) == {1: [None, None], 2: [0.9, None],
                                                                                   3: [0.6, 0.6]}
    with pytest.raises(SystemExit, match="other.log: step 3 trained 13 tokens, the replay 12"):
        rows_per_process.gpu_seconds(per_step, {"other.log": [same[0], {**same[1], "tokens": 13}]})


def test_rows_per_process_records_the_rows_each_process_trained_on(tmp_path):
    # Two CPU processes: the tokens recorded per process add up, step by step, to what the stage itself
    # counted and logged (the numbers the GPU runs' slow steps are matched against); the stage's own log
    # passes as a GPU log of the same rows.
    out, log = tmp_path / "rows.json", tmp_path / "work/2x2/train.log"
    command = [sys.executable, "-m", "benchmarks.rows_per_process", "--out", str(out), "--processes", "2",
               "--per-device", "2", "--steps", "3", "--rows", "40", "--work-dir", str(tmp_path / "work")]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    steps = json.loads(out.read_text(encoding="utf-8"))["steps"]
    logged = {s["step"]: s for s in step_times(log)["steps"]}
    assert set(logged) == {2, 3} and [s["step"] for s in steps] == [1, 2, 3]
    assert all(len(s["per_process"]) == 2 and min(s["per_process"]) > 0 for s in steps)
    assert [s["tokens"] for s in steps[1:]] == [logged[2]["tokens"], logged[3]["tokens"]]
    rerun = subprocess.run([*command, "--gpu-log", str(log.rename(tmp_path / "gpu.log"))], cwd=ROOT, check=True,
                           capture_output=True)
    steps = json.loads(out.read_text(encoding="utf-8"))["steps"]
    assert [s["gpu_seconds"] for s in steps] == [[None], [logged[2]["seconds"]], [logged[3]["seconds"]]]
    assert "GPU s:" in rerun.stdout.decode()


def test_exact_slots_trial_leaves_unsloths_slots_as_unsloth_sizes_them(monkeypatch):
    # The comparison the stage's whole-block slots rest on: with BENCH_EXACT_SLOTS the stage's change
    # is off in the trial's process (and so in every process it relaunches), before the model loads.
    module, _ = offload_helpers()
    shipped, ran = module._new_host_buffer, []
    monkeypatch.setattr(unsloth_runtime, "offload_slots_in_whole_pinned_blocks",
                        unsloth_runtime.offload_slots_in_whole_pinned_blocks)  # put back after the test
    monkeypatch.setattr(trial_train, "run_stage_as", lambda name, after_load: ran.append(name))
    monkeypatch.setenv("BENCH_EXACT_SLOTS", "1")
    trial_train.main()
    assert ran == ["benchmarks.trial_train"]
    assert not unsloth_runtime.offload_slots_in_whole_pinned_blocks(module) and module._new_host_buffer is shipped


def test_host_slot_timing_logs_each_growth_and_the_benchmark_charges_it_to_the_next_step(tmp_path, capsys, monkeypatch):
    # The wrapped functions behave like unsloth_zoo's: a new slot, and a resize_ that grows one in place.
    module, _ = offload_helpers()
    monkeypatch.setenv("LOCAL_RANK", "1")
    unsloth_runtime.offload_slots_in_whole_pinned_blocks(module)  # as the stage sizes them, then timed
    trial_train.time_host_slots(module)
    slot = module._new_host_buffer(300_000, torch.bfloat16)  # 600,000 bytes: a 1 MiB block
    assert slot.numel() == 524_288  # unsloth grows a slot only past its numel: here, past the block
    printed = capsys.readouterr().out
    module._grow_host_buffer(slot, 600_000)  # 1.2 MB: the next block, 2 MiB
    grown = capsys.readouterr().out.strip()
    assert "rank 1 new 0.0 -> 1.0 MiB" in printed
    assert grown.startswith("benchmark trial: host slot rank 1 grown 1.0 -> 2.0 MiB in ")
    step = "10:07:55 INFO stages.train: step {}/3  loss 2.0"
    lines = [printed.splitlines()[-1], step.format(1), step.format(2) + "  1 tokens/s (9 tokens in 1.0 s)",
             grown, grown.replace("rank 1", "rank 0"), grown, step.format(3) + "  1 tokens/s (9 tokens in 1.0 s)",
             grown]  # the last line has no step after it: charged to none
    log_file = tmp_path / "train.log"
    log_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ms = float(grown.split(" in ")[1].split()[0])
    assert host_slot_times(log_file) == [
        {"step": 1, "rank": 1, "new": 1, "grown": 0, "ms": pytest.approx(float(printed.split(" in ")[-1].split()[0]))},
        {"step": 3, "rank": 0, "new": 0, "grown": 1, "ms": pytest.approx(ms)},
        {"step": 3, "rank": 1, "new": 0, "grown": 2, "ms": pytest.approx(2 * ms, abs=0.011)}]


def test_the_adapter_check_cosine_stays_a_cosine_over_tens_of_millions_of_weights():
    # In float32, torch's cosine_similarity over an adapter-sized vector came out at 1.0097 on the GPU.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20_000_000, generator=generator) * 1e-3
    y = x + torch.randn(20_000_000, generator=generator) * 1e-4
    expected = 1 / (1 + 0.1 ** 2) ** 0.5  # y's noise is a tenth of x: cos = 1 / sqrt(1.01)
    assert cosine(x, y) == pytest.approx(expected, abs=1e-4) and cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cosine(x, -x) == pytest.approx(-1.0, abs=1e-12)
