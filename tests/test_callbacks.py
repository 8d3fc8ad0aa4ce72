"""The train stage's Trainer callbacks, driven by hand with transformers' own state objects: the log
line, the DVCLive curves, the resumable accounting, the mean train loss and the throughput."""

import csv
import json
import logging
import math

import pytest
from transformers import TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback

from stages import callbacks
from stages.callbacks import LogLine, LossCurves, ResumableAccounting, Throughput, mean_train_loss
from stages.checkpoints import COMPLETE_MARK


class _Trainer:
    """The three callback methods of transformers' Trainer, on a real CallbackHandler."""

    def __init__(self, *callbacks_):
        self.callback_handler = CallbackHandler(list(callbacks_), None, None, None, None)

    def add_callback(self, callback):
        self.callback_handler.add_callback(callback)

    def remove_callback(self, callback):
        self.callback_handler.remove_callback(callback)

    def names(self):
        return [type(c).__name__ for c in self.callback_handler.callbacks]


def test_quiet_progress_keeps_the_bar_and_drops_the_dict_dumps(capsys):
    trainer = _Trainer(DefaultFlowCallback, PrinterCallback, ProgressCallback, ResumableAccounting)
    callbacks.quiet_progress(trainer)
    assert trainer.names() == ["DefaultFlowCallback", "ResumableAccounting", "ProgressBarOnly"]
    callbacks.ProgressBarOnly().on_log(None, TrainerState(is_world_process_zero=True), None, logs={"loss": 1.0})
    assert capsys.readouterr().out == ""  # ProgressCallback would print the dict
    without_bar = _Trainer(DefaultFlowCallback, PrinterCallback, ResumableAccounting)  # `disable_tqdm`: no bar
    callbacks.quiet_progress(without_bar)
    assert without_bar.names() == ["DefaultFlowCallback", "ResumableAccounting"]


def _state(step=0, tokens=0, zero=True, max_steps=6):
    state = TrainerState(max_steps=max_steps, is_world_process_zero=zero)
    state.global_step, state.num_input_tokens_seen = step, tokens
    return state


def test_one_log_line_per_logging_step_with_the_rate_since_the_last(caplog, monkeypatch):
    clock = iter([10.0, 12.0, 12.0, 14.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    line = LogLine()
    with caplog.at_level(logging.INFO, logger="stages.train"):
        line.on_log(None, _state(2, 1000), None, logs={"loss": 2.5, "learning_rate": 2e-4, "grad_norm": 0.75})
        line.on_log(None, _state(4, 5000), None, logs={"loss": 2.0})
        line.on_log(None, _state(4, 5000), None, logs={"loss": 1.9})  # no time passed: no rate
        line.on_log(None, _state(4, 5000), None, logs={"eval_loss": 1.23456, "loss": 9.0})
    assert [r.getMessage() for r in caplog.records] == [
        "step 2/6  loss 2.5000  lr 2.00e-04  grad_norm 0.750",
        "step 4/6  loss 2.0000  lr 0.00e+00  grad_norm nan  2,000 tokens/s (4,000 tokens in 2.000 s)",
        "step 4/6  loss 1.9000  lr 0.00e+00  grad_norm nan",
        "step 4/6  eval_loss 1.2346",
    ]
    assert all(r.name == "stages.train" and r.levelno == logging.INFO for r in caplog.records)


def test_log_lines_only_from_the_main_process_and_only_for_losses(caplog, monkeypatch):
    now, line = _clocked(monkeypatch), LogLine()
    with caplog.at_level(logging.INFO, logger="stages.train"):
        line.on_log(None, _state(1, 100, zero=False), None, logs={"loss": 1.0})
        line.on_log(None, _state(1, 100), None, logs={})
        line.on_log(None, _state(1, 100), None, logs=None)
        line.on_log(None, _state(1, 100), None, logs={"train_runtime": 5.0})  # the Trainer's last summary
        assert caplog.records == []
        now[0] = 1.0
        line.on_log(None, _state(2, 300), None, logs={"loss": 1.0})
        now[0] = 3.0
        line.on_log(None, _state(3, 500), None, logs={"loss": 1.0})
    assert caplog.records[0].getMessage().endswith("grad_norm nan")  # nothing before it: no rate
    assert caplog.records[1].getMessage().endswith("100 tokens/s (200 tokens in 2.000 s)")


def _curve(directory, name):
    with open(directory / "plots" / "metrics" / f"{name}.tsv", newline="") as handle:
        return [(int(row["step"]), float(row[name.split("/")[-1]])) for row in csv.DictReader(handle, delimiter="\t")]


def test_loss_curves_replay_the_history_then_log_each_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    directory = tmp_path / "dvclive"
    (directory / "plots" / "metrics" / "train").mkdir(parents=True)
    (directory / "plots" / "metrics" / "train" / "loss.tsv").write_text("step\tloss\n9\t9.0\n")  # a killed run's
    curves = LossCurves(str(directory))
    curves.on_log(None, _state(1), None, logs={"loss": 5.0})  # before train begin: no Live yet, ignored
    state = _state(2)
    state.log_history = [{"loss": 3.0, "learning_rate": 1e-4, "grad_norm": 0.5, "step": 1},
                         {"eval_loss": 2.5, "step": 2}]
    curves.on_train_begin(None, state, None)
    curves.on_log(None, _state(3), None, logs={"loss": 2.0, "learning_rate": 5e-5, "epoch": 0.5})
    curves.on_log(None, _state(3), None, logs={})
    curves.on_log(None, _state(4), None, logs={"eval_loss": 1.75})
    curves.end()
    assert _curve(directory, "train/loss") == [(1, 3.0), (3, 2.0)]
    assert _curve(directory, "eval/loss") == [(2, 2.5), (4, 1.75)]
    assert _curve(directory, "train/learning_rate") == [(1, 1e-4), (3, 5e-5)]
    assert _curve(directory, "train/grad_norm") == [(1, 0.5)]
    assert not (directory / "metrics.json").exists()  # DVCLive's summary: not kept
    assert sorted(p.name for p in (directory / "plots" / "metrics").iterdir()) == ["eval", "train"]
    assert list(tmp_path.iterdir()) == [directory]  # no dvc.yaml of DVCLive's: the project's own declares the plots


def test_loss_curves_only_on_the_main_process(tmp_path):
    curves = LossCurves(str(tmp_path / "dvclive"))
    curves.on_train_begin(None, _state(0, zero=False), None)
    curves.on_log(None, _state(1, zero=False), None, logs={"loss": 1.0})
    curves.end()
    assert curves.live is None and not (tmp_path / "dvclive").exists()


def test_every_checkpoint_step_and_the_last_are_logged(tmp_path):
    accounting = ResumableAccounting()
    for step, save, logged in ((1, False, False), (2, True, True), (5, False, False), (6, False, True), (7, False, True)):
        control = TrainerControl(should_save=save)
        accounting.on_step_end(None, _state(step, max_steps=6), control)
        assert control.should_log is logged, step


def test_a_checkpoint_is_marked_complete_once_saved(tmp_path):
    class Args:
        output_dir = str(tmp_path)

    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-6").mkdir()
    ResumableAccounting().on_save(Args, _state(4), TrainerControl())
    ResumableAccounting().on_save(Args, _state(6, zero=False), TrainerControl())
    assert json.loads((tmp_path / "checkpoint-4" / COMPLETE_MARK).read_text()) == {"step": 4}
    assert not (tmp_path / "checkpoint-6" / COMPLETE_MARK).exists()  # another process marks it


def test_the_mean_train_loss_weights_each_logged_window_by_its_steps():
    history = [{"loss": 4.0, "step": 3}, {"eval_loss": 9.0, "step": 3}, {"loss": 1.0, "step": 4},
               {"loss": 7.0}, {"train_runtime": 1.0, "step": 4}]
    assert mean_train_loss(history) == pytest.approx((4.0 * 3 + 1.0 * 1) / 4)
    assert mean_train_loss([{"loss": 2.0, "step": 1}]) == 2.0
    for empty in ([], [{"eval_loss": 1.0, "step": 2}]):
        with pytest.raises(ValueError, match="^no training loss was logged$"):
            mean_train_loss(empty)


def _clocked(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])
    return now


def test_throughput_leaves_out_warmup_and_pauses_but_not_from_the_session(monkeypatch):
    now, meter = _clocked(monkeypatch), Throughput()
    meter.on_train_begin(None, _state(0, 500), None)
    for step in range(1, 6):
        now[0] += 8.0 if step == 1 else 2.0
        meter.on_step_end(None, _state(step, 500 + 1000 * step), None)
        if step in (1, 4):
            now[0] += 3.0
            meter.on_save(None, None, None)
            now[0] += 1.0
            meter.on_evaluate(None, None, None)
    now[0] += 0.25
    meter.on_train_end(None, _state(5, 5500), None)
    # runtime (to 0.1 s): 8 + 4 x 2 + 2 x 4 paused + 0.25; steady: from the mark after step 2 (4 s paused before it)
    # to the end, less the 4 s paused after step 4
    assert meter.summary() == {"runtime_s": 24.2, "tokens_per_s": round(5000 / 24.25, 1),
                               "steady_tokens_per_s": round(3000 / (24.25 - 14.0 - 4.0), 1)}


def test_a_new_session_starts_its_own_accounting(monkeypatch):
    now, meter = _clocked(monkeypatch), Throughput()
    meter.on_train_begin(None, _state(0), None)
    now[0] += 5.0
    meter.on_step_end(None, _state(1, 100), None)
    now[0] += 5.0
    meter.on_evaluate(None, None, None)
    meter.on_train_begin(None, _state(1, 100), None)  # resumed: only this session counts
    assert meter.marks == [(10.0, 100, 0.0)] and meter.paused == 0.0
    meter.on_evaluate(None, None, None)  # before any step: nothing to pause
    assert meter.paused == 0.0
    now[0] += 2.0
    meter.on_step_end(None, _state(2, 300), None)
    now[0] += 1.0
    meter.on_train_end(None, _state(2, 300), None)
    now[0] += 7.0
    meter.on_evaluate(None, None, None)  # the stage's evaluation after training
    assert meter.paused == 0.0 and meter.marks[-1] == (13.0, 300, 0.0)
    # two marks after the start: warmup shrinks to keep one interval; nothing paused
    assert meter.summary() == {"runtime_s": 3.0, "tokens_per_s": round(200 / 3.0, 1), "steady_tokens_per_s": 0.0}


def test_a_run_shorter_than_a_second_still_has_a_speed(monkeypatch):
    now, meter = _clocked(monkeypatch), Throughput()
    meter.on_train_begin(None, _state(0, 0), None)
    now[0] += 0.5
    meter.on_train_end(None, _state(0, 300), None)  # begin and end only: one interval, no warmup to leave out
    assert meter.summary() == {"runtime_s": 0.5, "tokens_per_s": 600.0, "steady_tokens_per_s": 600.0}


def test_throughput_of_a_run_that_never_stepped_is_zero(monkeypatch):
    now, meter = _clocked(monkeypatch), Throughput()
    zero = {"runtime_s": 0.0, "tokens_per_s": 0.0, "steady_tokens_per_s": 0.0}
    assert meter.summary() == zero
    meter.on_train_begin(None, _state(0), None)
    assert meter.summary() == zero
    meter.on_train_end(None, _state(0), None)  # no time passed: no division by zero
    assert meter.summary() == zero
    assert not any(math.isnan(v) for v in meter.summary().values())
