"""The hand-made breakages of issue 24, kept as a check that the tests still catch each of them.

    python -m tools.breakages                   every breakage, up to the first failing test of each
    python -m tools.breakages --every-test      each breakage against all its tests (48 min of wall
                                                time on two loaded, shared cores; 12 min of CPU)
    python -m tools.breakages --only NAME ...   these breakages only
    python -m tools.breakages --list            the table, nothing run

Each breakage is a small, plausible mistake in one file: its exact old text and the new text that
replaces it. For each, this copies the project (the files git tracks or would track) to a
temporary folder, makes the one replacement there and runs the tests that cover it in that copy
with pytest, stopping at the first failure: **caught** when a test fails, **survived** when they
all pass, **error** when pytest could not run them (a collection error, a test id that is gone),
**equivalent** when it survives and its entry says why no test can catch it.
A breakage whose old text is not found exactly once is **stale** (the code moved on: update its
entry) and is not run. Your working tree is never touched. Exits 1 when any breakage survived
(other than an equivalent one), is stale or in error, so the table cannot rot silently.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Breakage:
    name: str
    file: str  # relative to the project root
    old: str  # found exactly once in `file`
    new: str
    tests: tuple[str, ...]  # pytest node ids that must catch it, cheapest first (pytest stops at the first failure)
    equivalent: str = ""  # why no test can catch it (the behaviour does not change), when that is so


BREAKAGES = [
    Breakage(
        "decision-chat-ignores-include-contexts", "stages/prompt.py",
        "    messages = build_messages(system, question, contexts, include_contexts)\n",
        "    messages = build_messages(system, question, contexts)\n",
        ("tests/test_decision.py::test_without_contexts_the_decision_chat_holds_the_question_alone",)),
    Breakage(
        "train-validates-on-the-training-rows", "stages/train.py",
        'eval_set = tokenized_split("validation", tokenizer,',
        'eval_set = tokenized_split("train", tokenizer,',
        ("tests/test_train.py::test_the_last_eval_loss_is_the_final_models_on_the_validation_rows",
         "tests/test_evaluate.py::test_the_validation_loss_is_the_loss_on_the_validation_rows")),
    Breakage(
        "train-skips-the-final-evaluation", "stages/train.py",
        "        trainer.evaluate()  # the last step was not an eval step: measure the final model too\n",
        "        pass\n",
        ("tests/test_train.py::test_the_last_eval_loss_is_the_final_models_on_the_validation_rows",),
        equivalent="transformers 5.17's DefaultFlowCallback evaluates at the last step itself when it is not an "
                   "eval step, so this trainer.evaluate() never runs; the test checks the outcome"),
    Breakage(
        "train-loss-unweighted-over-logged-windows", "stages/callbacks.py",
        '            total += entry["loss"] * (entry["step"] - previous)\n            previous = entry["step"]\n',
        '            total += entry["loss"]\n            previous += 1\n',
        ("tests/test_train.py::test_the_train_loss_weights_each_logged_window_by_its_steps",
         "tests/test_train.py::test_the_last_eval_loss_is_the_final_models_on_the_validation_rows")),
    Breakage(
        "evaluate-validation-loss-on-the-test-split", "stages/evaluation.py",
        'validation, test = read_split("validation"), read_split("test")',
        'validation, test = read_split("test"), read_split("test")',
        ("tests/test_evaluate.py::test_the_validation_loss_is_the_loss_on_the_validation_rows",)),
    Breakage(
        "evaluate-base-without-its-test-split-dep", "dvc.yaml",
        "      - data/prepared/test.jsonl\n    # Only what the scoring reads",
        "    # Only what the scoring reads",
        ("tests/test_dvc_yaml.py::test_every_file_a_stage_reads_is_a_dependency_and_every_data_dep_is_read"
         "[evaluate_base]",)),
    Breakage(
        "validate-skips-the-merge-base-folder", "stages/preflight.py",
        '(("model.name", params.model.name), ("model.base_16bit", params.model.base_16bit))',
        '(("model.name", params.model.name),)',
        ("tests/test_user_mistakes.py::test_a_mistake_is_one_line_and_exit_2[merge-base-folder-missing]",)),
    Breakage(
        "validate-skips-the-split-count", "stages/validate.py",
        "    n_train, n_val, n_test = split_counts(len(rows), data.val_size, data.test_size, dropped)\n",
        "    n_train, n_val, n_test = len(rows), 0, 0\n",
        ("tests/test_user_mistakes.py::test_a_mistake_is_one_line_and_exit_2[test-size-beyond-the-data]",)),
    Breakage(
        "validate-leaves-the-device-to-train", "stages/preflight.py",
        "    check_can_load(params.model)\n", "",
        ("tests/test_user_mistakes.py::test_a_mistake_is_one_line_and_exit_2[4bit-without-cuda]",)),
    Breakage(
        "params-keep-the-last-of-two-equal-keys", "stages/params.py",
        "            if key in lines:\n", "            if False:\n",
        ("tests/test_user_mistakes.py::test_a_mistake_is_one_line_and_exit_2[duplicate-key]",)),
    Breakage(
        "lora-rank-unbounded-by-the-model", "stages/preflight.py",
        '("lora.r", params.lora.r, hidden, "hidden_size")', '("lora.r", params.lora.r, None, "hidden_size")',
        ("tests/test_user_mistakes.py::test_a_mistake_is_one_line_and_exit_2[lora-r-huge]",)),
    Breakage(
        "adapter-deleted-by-dvc-before-train", "dvc.yaml",
        "      - models/adapter:\n          persist: true\n",
        "      - models/adapter\n",
        ("tests/test_dvc_yaml.py::test_every_output_persists_so_dvc_never_deletes_the_last_result_before_a_stage_runs",
         "tests/test_nothing_lost.py::test_a_stopped_stage_leaves_every_output_as_it_was[train-sigterm]")),
    Breakage(
        "killed-publication-left-half-done", "stages/outputs.py",
        "    recover_interrupted_publications()\n    for final in finals:\n",
        "    for final in finals:\n",
        ("tests/test_outputs_fast.py::test_a_kill_while_outputs_are_replaced_is_rolled_back_by_the_next_write",)),
    Breakage(
        "outputs-keep-the-replaced-folder", "stages/outputs.py",
        "            _remove(old)\n",
        "            pass\n",
        ("tests/test_outputs.py::test_replacing_a_folder_and_its_metrics_leaves_no_temporary_behind",)),
    Breakage(
        "plots-confusion-transposed", "stages/plots.py",
        "if str(x) == row and str(y) == column",
        "if str(x) == column and str(y) == row",
        ("tests/test_review.py::test_a_confusion_heatmap_has_reference_rows_decision_columns_in_the_options_order",
         "tests/test_review.py::test_the_plotted_confusion_cells_equal_the_reports_matrices")),
    Breakage(
        "review-plots-without-the-base-revision", "tools/review.py",
        "render(plot_data([base]), plots_dir)",
        "render(plot_data(), plots_dir)",
        ("tests/test_review.py::test_the_review_comments_plots_hold_both_revisions",)),
    Breakage(
        "decoding-refilled-slot-sees-the-last-answers-stop", "stages/slots.py",
        "stopped = (torch.isin(self.history, self.stops) & written).any(dim=1)",
        "stopped = torch.isin(self.history, self.stops).any(dim=1)",
        ("tests/test_slots.py::test_a_refilled_slot_ignores_the_stop_token_of_the_answer_before_it",
         "tests/test_slots.py::test_a_stale_stop_token_past_the_written_tokens_is_not_read",
         "tests/test_decoding.py::test_late_stops_and_refills_after_a_first_answer_ended_write_what_generate_writes")),
    Breakage(
        "decoding-positions-not-clamped-at-max-len", "stages/slots.py",
        "self.positions.copy_((self.positions + 1).clamp(max=self.max_len - 1))",
        "self.positions.copy_(self.positions + 1)",
        ("tests/test_slots.py::test_a_free_slot_runs_on_at_the_last_column_of_its_row",
         "tests/test_decoding.py::test_an_idle_slot_past_max_len_leaves_the_other_answer_as_generate_writes_it")),
    Breakage(
        "decoding-no-continuous-batching", "stages/decoding.py",
        "if continuous or slots.all_free():",
        "if slots.all_free():",
        ("tests/test_decoding.py::test_a_slot_is_refilled_while_another_answer_is_still_written",)),
    Breakage(
        "memory-counts-the-loaded-weights-as-free", "stages/memory.py",
        "return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()",
        "return free + torch.cuda.memory_reserved()",
        ("tests/test_decoding.py::test_free_bytes_on_an_h100_holding_the_8b_model",)),
]


def project_files(root: Path = ROOT) -> list[str]:
    """What git tracks or would track (not ignored): the project without its venv, models or caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            check=True, capture_output=True).stdout.decode()
    return sorted({name for name in listed.split("\0") if name and (root / name).is_file()})


def occurrences(breakage: Breakage, root: Path = ROOT) -> int:
    path = root / breakage.file
    return path.read_text(encoding="utf-8").count(breakage.old) if path.is_file() else 0


def copy_project(dest: Path, root: Path = ROOT) -> Path:
    for name in project_files(root):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
    return dest


def run_one(breakage: Breakage, every_test: bool = False) -> tuple[str, float, str]:
    """(result, seconds, the first failing test or pytest's last line) of one breakage; with
    `every_test` all its tests run (not only up to the first failure) and the detail is pytest's summary."""
    if occurrences(breakage) != 1:
        return "stale", 0.0, f"old text found {occurrences(breakage)} times in {breakage.file}"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"breakage-{breakage.name}-") as folder:
        copy = copy_project(Path(folder) / "project")
        path = copy / breakage.file
        path.write_text(path.read_text(encoding="utf-8").replace(breakage.old, breakage.new), encoding="utf-8")
        # The copy's stages/ and tools/ first, ahead of any editable install of the project.
        env = {**os.environ, "PYTHONPATH": str(copy)}
        # One process (-n 0): under xdist workers a stop at the first failure exits 2, not 1.
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                                 *([] if every_test else ["-x"]), *breakage.tests],
                                cwd=copy, env=env, capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    failed = next((line for line in lines if line.startswith(("FAILED", "ERROR"))), lines[-1] if lines else "")
    if every_test:
        failed = lines[-1] if lines else ""
    outcome = {0: "survived", 1: "caught"}.get(result.returncode, "error")
    if outcome == "survived" and breakage.equivalent:
        return "equivalent", time.perf_counter() - started, breakage.equivalent
    return outcome, time.perf_counter() - started, failed


def parse_args(argv=None) -> argparse.Namespace:
    from stages import cli

    parser = cli.parser("tools.breakages", __doc__)
    parser.add_argument("--only", nargs="+", action="extend", metavar="NAME", help="run these breakages only")
    parser.add_argument("--list", action="store_true", help="print the table of breakages and their tests, run nothing")
    parser.add_argument("--every-test", action="store_true",
                        help="run all of a breakage's tests, not only up to the first failure (slower)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    known = {b.name for b in BREAKAGES}
    unknown = sorted(set(args.only or []) - known)
    if unknown:
        print(f"error: no breakage named {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    chosen = [b for b in BREAKAGES if not args.only or b.name in args.only]
    if args.list:
        for b in chosen:
            found = occurrences(b)
            print(f"{b.name}  {b.file}{'' if found == 1 else f'  STALE: old text found {found} times'}")
            if b.equivalent:
                print(f"    (equivalent: {b.equivalent})")
            for test in b.tests:
                print(f"    {test}")
        return 0
    print(f"{'breakage':45} {'file':22} {'result':9} {'seconds':>7}  first failure", flush=True)
    results = []
    for b in chosen:
        outcome, seconds, detail = run_one(b, args.every_test)
        results.append(outcome)
        print(f"{b.name:45} {b.file:22} {outcome:9} {seconds:7.0f}  {detail}", flush=True)
    print(f"{results.count('caught')} of {len(results)} caught, {results.count('equivalent')} equivalent; "
          f"survived {results.count('survived')}, stale {results.count('stale')}, error {results.count('error')}")
    return 0 if all(outcome in ("caught", "equivalent") for outcome in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
