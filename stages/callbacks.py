"""Trainer callbacks of the train stage: log lines, DVCLive curves, throughput, resumable accounting."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from stages.checkpoints import mark_complete

log = logging.getLogger("stages.train")

CURVES = {"loss": "train/loss", "eval_loss": "eval/loss", "learning_rate": "train/learning_rate",
          "grad_norm": "train/grad_norm"}


class ProgressBarOnly(ProgressCallback):
    """transformers' progress bar without its dict dumps: LogLine says the same, readably."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def quiet_progress(trainer) -> None:
    """Keep transformers' progress bar but drop its raw dict print-outs."""
    trainer.remove_callback(PrinterCallback)
    if trainer.callback_handler.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBarOnly)


class LogLine(TrainerCallback):
    """One line per logging step: step, loss, learning rate, gradient norm, tokens/s."""

    def __init__(self):
        self._last = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        if "eval_loss" in logs:
            log.info("step %d/%d  eval_loss %.4f", state.global_step, state.max_steps, logs["eval_loss"])
            return
        if "loss" not in logs:
            return
        rate = ""
        if self._last is not None and now > self._last[0]:
            seconds, seen = now - self._last[0], tokens - self._last[1]
            rate = f"  {seen / seconds:,.0f} tokens/s ({seen:,} tokens in {seconds:.3f} s)"
        self._last = (now, tokens)
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f%s", state.global_step, state.max_steps,
            logs["loss"], logs.get("learning_rate", 0.0), logs.get("grad_norm", float("nan")), rate,
        )


class LossCurves(TrainerCallback):
    """Train and eval loss per optimizer step into DVCLive, for `dvc plots show/diff`.

    The curves start afresh at every train begin and first replay the Trainer's log history, which
    a resumed run restores from its checkpoint: a resumed run draws every step from 1, exactly as
    an uninterrupted one, whatever DVC or the killed run left in the folder.
    """

    def __init__(self, directory: str):
        self.directory, self.live = directory, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from dvclive import Live

            self.live = Live(self.directory, resume=False, save_dvc_exp=False, dvcyaml=None)
            for logs in state.log_history:
                self._log(logs["step"], logs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is not None and logs:
            self._log(state.global_step, logs)

    def _log(self, step: int, logs: dict) -> None:
        self.live.step = step  # x axis = optimizer step, for train and eval alike
        for key, name in CURVES.items():
            if key in logs:
                self.live.log_metric(name, float(logs[key]))

    def end(self) -> None:
        """After the final evaluation (which may come after train end)."""
        if self.live is not None:
            self.live.end()
            # DVCLive's own summary (last loss, learning rate, step) repeats metrics/train.json and
            # would be an untracked file beside the git-tracked curves: only the curves stay.
            Path(self.live.metrics_file).unlink(missing_ok=True)


class ResumableAccounting(TrainerCallback):
    """What makes a resumed run write exactly what an uninterrupted one writes.

    Every checkpoint step and the last step are also logging steps, so the log history saved in
    each checkpoint holds the loss of every step up to it (`mean_train_loss` needs nothing else);
    and a checkpoint is marked complete only once the Trainer has finished saving it.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            mark_complete(f"{args.output_dir}/checkpoint-{state.global_step}", state.global_step)


def mean_train_loss(log_history: list[dict]) -> float:
    """Mean training loss over every optimizer step, from the logged per-window means.

    transformers' own `training_loss` averages only the steps run in this session: a run resumed
    at step 40 of 60 would report the mean of steps 41-60 over all 60.
    """
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    if previous == 0:
        raise ValueError("no training loss was logged")
    return total / previous


class Throughput(TrainerCallback):
    """Non-padding tokens per second of this session (a resumed run counts only its own part).

    `tokens_per_s` is the whole session's. `steady_tokens_per_s` is training speed: it leaves out
    the first WARMUP_STEPS optimizer steps, where kernels are compiled and caches warmed, and the
    time spent validating and saving checkpoints (the Trainer does both after a step ends, the last
    save after the last step), so runs of different lengths, eval_steps and save_steps compare.
    """

    WARMUP_STEPS = 2

    def __init__(self):
        self.marks = []  # (seconds, tokens seen, seconds paused so far): at train begin, after every step, at end
        self.paused, self._since = 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.paused, self._since = 0.0, None
        self.marks = [(time.perf_counter(), state.num_input_tokens_seen, 0.0)]

    def on_step_end(self, args, state, control, **kwargs):
        self._since = time.perf_counter()
        self.marks.append((self._since, state.num_input_tokens_seen, self.paused))

    def _pause(self) -> None:
        """Validation or a checkpoint save has just ended: its time since the step (or the last pause) ended."""
        now = time.perf_counter()
        if self._since is not None:
            self.paused += now - self._since
        self._since = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._pause()

    def on_save(self, args, state, control, **kwargs):
        self._pause()

    def on_train_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen, self.paused))
        self._since = None  # an evaluation after training is not part of it

    @staticmethod
    def _rate(first, last, paused: bool) -> float:
        seconds = last[0] - first[0] - ((last[2] - first[2]) if paused else 0.0)
        return round((last[1] - first[1]) / seconds, 1) if seconds > 0 else 0.0

    def summary(self) -> dict[str, float]:
        if len(self.marks) < 2:
            return {"runtime_s": 0.0, "tokens_per_s": 0.0, "steady_tokens_per_s": 0.0}
        steady_from = self.marks[min(self.WARMUP_STEPS, len(self.marks) - 2)]
        return {
            "runtime_s": round(self.marks[-1][0] - self.marks[0][0], 1),
            "tokens_per_s": self._rate(self.marks[0], self.marks[-1], paused=False),
            "steady_tokens_per_s": self._rate(steady_from, self.marks[-1], paused=True),
        }
