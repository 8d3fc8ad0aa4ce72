"""tools/review.py's logic without DVC: the `dvc` calls answered with the JSON and text DVC prints, so
each part of the pull-request comment and the experiment table is checked line by line."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages import plots
from stages.errors import UserError
from stages.headline import HEADLINE
from tools import review


def _answers(monkeypatch, replies: dict) -> list[tuple]:
    """Answer `review.dvc(*args)` from `replies` (keyed by the args' first two words); record each call."""
    calls = []

    def dvc(*args):
        calls.append(args)
        return replies[args[:2]]

    monkeypatch.setattr(review, "dvc", dvc)
    return calls


def test_dvc_runs_this_interpreters_dvc_and_returns_its_output(monkeypatch):
    seen = []

    def run(command, **kwargs):
        seen.append((command, kwargs))
        return subprocess.CompletedProcess(command, 0, stdout="out\n", stderr="a warning\n")

    monkeypatch.setattr(review.subprocess, "run", run)
    assert review.dvc("metrics", "diff", "main") == "out\n"
    assert seen == [([sys.executable, "-m", "dvc", "metrics", "diff", "main"], {"capture_output": True, "text": True})]


@pytest.mark.parametrize("stdout, stderr, last", [
    ("", "ERROR: unknown revision 'nope'\nsee the docs\n", "see the docs"),
    ("printed on stdout\nlast line\n", "", "last line"),
    ("", "  \n", "no output"),
])
def test_a_failing_dvc_is_one_line_with_its_last_words(monkeypatch, stdout, stderr, last):
    monkeypatch.setattr(review.subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 1, stdout=stdout, stderr=stderr))
    with pytest.raises(UserError) as found:
        review.dvc("metrics", "diff", "nope")
    assert str(found.value) == f"`dvc metrics diff nope` failed: {last}"


def test_metric_values_pair_each_metrics_old_and_new_value(monkeypatch):
    diff = {"metrics/train.json": {"train.loss": {"old": 1.5, "new": 1.2, "diff": -0.3}},
            "metrics/eval.json": {"tuned.test.accuracy": {"new": 0.6}, "tuned.test.rougeL": {"old": 0.2, "new": 0.2}}}
    calls = _answers(monkeypatch, {("metrics", "diff"): json.dumps(diff)})
    assert review.metric_values("main") == {("metrics/train.json", "train.loss"): (1.5, 1.2),
                                            ("metrics/eval.json", "tuned.test.accuracy"): (None, 0.6),
                                            ("metrics/eval.json", "tuned.test.rougeL"): (0.2, 0.2)}
    assert calls == [("metrics", "diff", "main", "--all", "--json")]
    _answers(monkeypatch, {("metrics", "diff"): ""})  # no metrics in either revision
    assert review.metric_values("main") == {}


def test_numbers_are_short_and_missing_ones_say_so():
    assert review._number(None) == "n/a"
    assert review._number(0.123456) == "0.1235"
    assert review._number(999.5) == "999.5000"
    assert review._number(1000.0) == "1,000.0"
    assert review._number(-12345.67) == "-12,345.7"
    assert review._number(12345) == "12345"  # an integer as it is
    assert review._number("abc") == "abc"


def test_the_verdict_follows_the_interval_and_the_better_direction():
    from stages.headline import verdict

    def interval(low, high):
        return {"delta": (low + high) / 2, "ci_low": low, "ci_high": high}

    assert verdict(interval(0.1, 0.3), "higher") == verdict(interval(-0.3, -0.1), "lower") == "better"
    assert verdict(interval(-0.3, -0.1), "higher") == verdict(interval(0.1, 0.3), "lower") == "worse"
    # a positive change whose interval spans or touches 0 is not a verdict, in either direction
    assert verdict(interval(-0.1, 0.3), "higher") == verdict(interval(0.0, 0.3), "higher") == "no clear change"
    assert verdict(interval(-0.3, 0.0), "lower") == "no clear change"
    assert verdict(None, "higher") == verdict({}, "lower") == "no interval"
    assert verdict(interval(float("nan"), 0.2), "higher") == verdict({"ci_low": True, "ci_high": 2}, "higher") \
        == "no interval"


def test_the_headline_table_has_one_row_per_headline_metric_in_order():
    accuracy, loss = HEADLINE[0], next(m for m in HEADLINE if m.key == "train.loss")
    shown = [m for m in HEADLINE if not m.key.startswith("vs_base.")]
    values = {(accuracy.file, accuracy.key): (0.5, 0.625), (loss.file, loss.key): (1.5, None),
              ("metrics/other.json", "x"): (1.0, 2.0)}
    lines = review.headline_table(values, "main", {}).splitlines()
    assert lines[:2] == ["| metric | main | this revision | change [95% interval] | verdict |",
                         "| --- | ---: | ---: | ---: | --- |"]
    assert len(lines) == 2 + len(shown)
    # no interval: the plain change, and no verdict from its sign
    assert lines[2] == "| `tuned.test.accuracy` (higher is better) | 0.5000 | 0.6250 | +0.1250 | no interval |"
    assert lines[2 + shown.index(loss)] == "| `train.loss` (lower is better) | 1.5000 | n/a | n/a | no interval |"
    assert lines[3] == "| `tuned.test.rougeL` (higher is better) | n/a | n/a | n/a | no interval |"
    assert [line.split("`")[1] for line in lines[2:]] == [m.key for m in shown]
    # with the paired interval: the paired change (not new minus old), its interval and the verdict
    intervals = {accuracy.key: {"delta": 0.1, "ci_low": 0.02, "ci_high": 0.18},
                 "tuned.test.rougeL": {"delta": 0.05, "ci_low": -0.01, "ci_high": 0.11}}
    values = {(accuracy.file, accuracy.key): (None, 0.5), (loss.file, loss.key): (2, 1)}
    lines = review.headline_table(values, "v1", intervals).splitlines()
    assert lines[2] == "| `tuned.test.accuracy` (higher is better) | n/a | 0.5000 | +0.1000 [+0.0200, +0.1800] | better |"
    assert lines[3] == "| `tuned.test.rougeL` (higher is better) | n/a | n/a | +0.0500 [-0.0100, +0.1100] " \
                       "| no clear change |"
    assert lines[2 + shown.index(loss)] == "| `train.loss` (lower is better) | 2 | 1 | -1.0000 | no interval |"


def test_the_report_summary_is_its_first_table(tmp_path):
    report = tmp_path / "report.md"
    assert review.report_summary(report) is None
    report.write_text("# Report\n\nno table yet\n", encoding="utf-8")
    assert review.report_summary(report) is None
    report.write_text("# Report\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\ntext\n\n| c |\n", encoding="utf-8")
    assert review.report_summary(report) == "| a | b |\n| --- | --- |\n| 1 | 2 |"
    report.write_text("| only | table |\n| --- | --- |", encoding="utf-8")  # up to the last line
    assert review.report_summary(report) == "| only | table |\n| --- | --- |"


def test_the_report_summary_reads_the_workspaces_report_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "report.md").write_text("| 질문 |\n", encoding="utf-8")
    assert review.report_summary() == "| 질문 |"


def test_the_plots_section_links_this_revisions_pngs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert review.plots_section("main", "", None) == [
        "No plots in this revision (`dvc repro` draws them into metrics/plots/)."]
    (tmp_path / "metrics" / "plots").mkdir(parents=True)
    for name in ("train-loss.png", "eval-loss.png", "notes.txt"):
        (tmp_path / "metrics" / "plots" / name).write_bytes(b"")
    assert review.plots_section("main", "", None) == [
        "This revision: [eval-loss](metrics/plots/eval-loss.png), [train-loss](metrics/plots/train-loss.png)"]
    assert review.plots_section("main", "https://host/blob/abc/", None) == [
        "This revision: [eval-loss](https://host/blob/abc/metrics/plots/eval-loss.png), "
        "[train-loss](https://host/blob/abc/metrics/plots/train-loss.png)"]
    assert review.plots_section("main", "https://host/tree/FIX", None)[0].startswith(
        "This revision: [eval-loss](https://host/tree/FIX/metrics/plots/eval-loss.png)")  # only the slash goes


def test_the_drawn_plots_hold_the_base_revision_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(plots, "plot_data", lambda revisions=None: asked.append(revisions) or ["the plots"])
    monkeypatch.setattr(plots, "render", lambda found, out_dir: [Path(out_dir) / f"{p}.png" for p in ("a", "b")
                                                                 if found == ["the plots"]])
    assert review.plots_section("v1", "", tmp_path / "drawn") == ["", f"![a]({tmp_path.as_posix()}/drawn/a.png)",
                                                                  f"![b]({tmp_path.as_posix()}/drawn/b.png)"]
    assert asked == [["v1"]]  # `dvc plots diff v1`: the base's curves and the workspace's


REPORT = "# Evaluation report\n\n- run\n\n| metric | base | fine-tuned |\n| --- | ---: | ---: |\n| ROUGE-L | 0.1 | 0.2 |\n"


def test_the_comment_puts_each_section_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "report.md").write_text(REPORT, encoding="utf-8")
    diff = {"metrics/train.json": {"train.loss": {"old": 1.5, "new": 1.25}, "train.eval_loss_last": {"old": 1.5, "new": 1.5},
                                   "train.steps": {"old": 10, "new": 20}},
            "metrics/cost/train.json": {"train.tokens_per_s": {"old": 900.0, "new": 1100.0}}}
    calls = _answers(monkeypatch, {("metrics", "diff"): json.dumps(diff), ("params", "diff"): "| Path | Param |\n\n"})
    text = review.comment("main")
    assert calls == [("metrics", "diff", "main", "--all", "--json"), ("params", "diff", "main", "--md")]
    assert text.endswith("\n") and not text.endswith("\n\n")
    lines = text.splitlines()
    assert lines[:4] == ["## Review against main", "", "### Headline metrics", ""]
    table = review.headline_table(review.metric_values("main"), "main", {})  # no git here: no paired interval
    assert "\n".join(lines[4:4 + len(table.splitlines())]) == table
    rest = lines[4 + len(table.splitlines()):]
    within = review.within_revisions_table(review.metric_values("main"), "main").splitlines()
    assert rest[:3] == ["", "Change = this revision minus main; the interval is a paired bootstrap over the test "
                            "questions both revisions answered: better / worse only when it excludes 0.", ""]
    assert rest[3:3 + len(within)] == within and within[0] == "| fine-tuned minus base | main | this revision |"
    rest = rest[3 + len(within):]
    assert rest == ["", "### Params", "", "| Path | Param |", "",
                    "<details><summary>2 other metrics changed (quality and cost)</summary>", "",
                    "| file | metric | main | this revision |", "| --- | --- | ---: | ---: |",
                    "| metrics/cost/train.json | `train.tokens_per_s` | 900.0000 | 1,100.0 |",
                    "| metrics/train.json | `train.steps` | 10 | 20 |",
                    "", "</details>", "",
                    "### Evaluation report", "", "| metric | base | fine-tuned |", "| --- | ---: | ---: |",
                    "| ROUGE-L | 0.1 | 0.2 |", "",
                    "### Plots", "", "No plots in this revision (`dvc repro` draws them into metrics/plots/)."]


def test_a_comment_with_nothing_changed_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics" / "plots").mkdir(parents=True)
    (tmp_path / "metrics" / "plots" / "loss.png").write_bytes(b"")
    _answers(monkeypatch, {("metrics", "diff"): "{}", ("params", "diff"): "\n"})
    text = review.comment("v2", link_base="https://h/")
    assert "<details>" not in text
    assert "### Params\n\nNo params changed against v2.\n\n### Evaluation report" in text
    assert "### Evaluation report\n\nNo table in metrics/report.md.\n\n### Plots" in text
    assert text.endswith("### Plots\n\nThis revision: [loss](https://h/metrics/plots/loss.png)\n")
    assert review.comment("v2").endswith("### Plots\n\nThis revision: [loss](metrics/plots/loss.png)\n")


def test_the_comments_drawn_plots_hold_the_base_revision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _answers(monkeypatch, {("metrics", "diff"): "{}", ("params", "diff"): ""})
    asked = []
    monkeypatch.setattr(plots, "plot_data", lambda revisions=None: asked.append(revisions) or ["the plots"])
    monkeypatch.setattr(plots, "render", lambda found, out_dir: [Path(out_dir) / "loss.png"])
    text = review.comment("v3", plots_dir=Path("drawn"))
    assert asked == [["v3"]]
    assert text.endswith("### Plots\n\n\n![loss](drawn/loss.png)\n")


def test_flatten_gives_dotted_keys_of_the_leaves():
    assert review.flatten({"train": {"loss": 1.0, "eval": {"best": 2, "last": 3}}, "steps": 5}) == [
        "train.loss", "train.eval.best", "train.eval.last", "steps"]
    assert review.flatten(1.0, "x") == ["x"]
    assert review.flatten({}) == []


EXP_SHOW = [
    {"rev": "workspace", "name": None, "data": {
        "metrics": {"metrics/eval.json": {"data": {"tuned": {"test": {"accuracy": 0.5, "rougeL": 0.2}}}},
                    "metrics/train.json": {"data": {"train": {"loss": 1.0, "eval_loss_best": 0.9}}},
                    "metrics/cost/train.json": None},
        "deps": {"data/prepared": {"hash": "x"}, "stages/train.py": {"hash": "y"}}},
     "experiments": [{"revs": [{"rev": "exp-1", "data": {
         "metrics": {"metrics/cost/train.json": {"data": {"train": {"runtime_s": 5}}},
                     "metrics/broken.json": {"error": "unreadable"}},
         "deps": {"stages/evaluate.py": {"hash": "z"}}}}]}]},
    {"rev": "main", "data": {"params": {"params.yaml": {}}}},
]


def test_experiment_columns_are_every_metric_and_dependency_of_every_row(monkeypatch):
    calls = _answers(monkeypatch, {("exp", "show"): json.dumps(EXP_SHOW)})
    metrics, deps = review.experiment_columns()
    assert calls == [("exp", "show", "--json")]
    keys = ["tuned.test.accuracy", "tuned.test.rougeL", "train.loss", "train.eval_loss_best", "train.runtime_s"]
    files = ["metrics/eval.json"] * 2 + ["metrics/train.json"] * 2 + ["metrics/cost/train.json"]
    assert metrics == set(keys) | {f"{file}:{key}" for file, key in zip(files, keys)}
    assert deps == {"data/prepared", "stages/train.py", "stages/evaluate.py"}


def test_the_experiment_table_drops_every_column_but_the_headline_and_params(monkeypatch):
    _answers(monkeypatch, {("exp", "show"): json.dumps(EXP_SHOW)})
    ran = []
    monkeypatch.setattr(review.subprocess, "run", lambda command, **kwargs: ran.append((command, kwargs)))
    review.show_experiments(["-n", "5"])
    [(command, kwargs)] = ran
    assert command[:7] == [sys.executable, "-m", "dvc", "exp", "show", "--only-changed", "--no-pager"]
    assert command[7] == "--drop" and command[9:] == ["-n", "5"] and kwargs == {"check": False}
    drop = re.compile(command[8])
    dropped = {"train.eval_loss_best", "metrics/train.json:train.eval_loss_best", "train.runtime_s",
               "metrics/cost/train.json:train.runtime_s", "data/prepared", "stages/train.py", "stages/evaluate.py",
               "Created", "State", "Executor"}
    kept = {"tuned.test.accuracy", "metrics/eval.json:tuned.test.accuracy", "tuned.test.rougeL", "train.loss",
            "metrics/train.json:train.loss", "Experiment", "train.lr", "xtrain.runtime_s", "Created2", "data/prepared/x"}
    assert {name for name in dropped | kept if drop.match(name)} == dropped


def help_entries(parse_args, capsys) -> tuple[str, dict[str, str]]:
    """`--help` as (description, {argument: its help}), the wrapped lines joined."""
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    paragraphs = capsys.readouterr().out.split("\n\n")
    entries = {}
    for line in "\n".join(p for p in paragraphs if p.startswith(("positional", "options"))).splitlines():
        if line.startswith("  ") and not line.startswith("   "):  # a new argument, its help beside or below it
            name, _, text = line.strip().partition("  ")
            entries[name] = text.strip()
        elif line.startswith("   "):
            entries[name] = f"{entries[name]} {line.strip()}".strip()
    return " ".join(paragraphs[1].split()), entries


def test_every_argument_is_explained_under_the_modules_first_line(capsys):
    description, entries = help_entries(review.parse_args, capsys)
    assert description == review.__doc__.splitlines()[0]
    assert set(entries) == {"base", "-h, --help", "--out OUT", "--plots-dir PLOTS_DIR", "--link-base LINK_BASE",
                            "--experiments"}
    assert all(len(text) > 20 for text in entries.values()), entries


def test_main_writes_the_comment_or_prints_it(tmp_path, monkeypatch, capsys):
    made = []
    monkeypatch.setattr(review, "comment", lambda *args: made.append(args) or "the comment\n")
    review.main(["main", "--out", str(tmp_path / "review.md"), "--link-base", "https://h", "--plots-dir",
                 str(tmp_path / "p")])
    assert (tmp_path / "review.md").read_text(encoding="utf-8") == "the comment\n"
    assert made == [("main", "https://h", tmp_path / "p")]
    review.main(["v1"])
    assert capsys.readouterr().out == "the comment\n"
    assert made[-1] == ("v1", "", None)


def test_main_shows_experiments_with_dvcs_own_options(monkeypatch):
    shown = []
    monkeypatch.setattr(review, "show_experiments", shown.append)
    review.main(["--experiments", "--all-commits", "--sha"])
    assert shown == [["--all-commits", "--sha"]]


@pytest.mark.parametrize("argv, said", [
    ([], "error: give the revision to compare with: python -m tools.review main"),
    (["main", "--unknown"], "error: unrecognized arguments: --unknown; see `python -m tools.review --help`")])
def test_main_without_a_base_or_with_unknown_options_says_what_to_give(monkeypatch, capsys, argv, said):
    monkeypatch.setattr(review, "comment", lambda *args: pytest.fail("no comment without a base"))
    with pytest.raises(SystemExit) as stopped:
        review.main(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == said
