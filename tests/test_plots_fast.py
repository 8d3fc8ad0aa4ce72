"""stages/plots.py's data side on a small DVC project in tmp_path (no git, no pipeline run): what it reads
from DVC and params.yaml, the names it gives the PNGs, the series it draws and the artists it draws them with."""

import json
import logging
from pathlib import Path

import pytest

from stages import plots
from stages.errors import UserError

DVC_YAML = """\
plots:
  - picture.png
  - Loss per step:
      x: step
      y_label: loss (nats)
      y:
        curves/train/loss.tsv: loss
        curves/eval/loss.tsv: loss
  - curves/lr.tsv:
      title: Learning rate
      x: step
      y: lr
  - Not written yet:
      x: step
      y:
        missing.tsv: loss
  - curves/grad.tsv:
      x: step
      y: grad
  - Decisions:
      template: confusion
      x: actual
      x_label: reference
      y:
        decisions.json: predicted
"""

# The confusion plots' classes come from eval.decision_options, in its order: here neither sorted nor the
# default order (yes, no, maybe), so a class list taken from anywhere but this file shows.
PARAMS_YAML = """\
eval:
  decision_options: {no: 아니요, yes: 예, maybe: 불확실}
"""
CLASSES = ["no", "yes", "maybe"]


@pytest.fixture
def project(tmp_path, monkeypatch, caplog) -> Path:
    from dvc.repo import Repo

    # DVC's own log handlers hold the stream of whichever test set them up, closed by now, and raise
    # on a write: its info and warnings ("Initialized DVC repository.") are not what these tests read
    caplog.set_level(logging.ERROR, logger="dvc")
    monkeypatch.chdir(tmp_path)
    Repo.init(".", no_scm=True).close()
    (tmp_path / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    (tmp_path / "params.yaml").write_text(PARAMS_YAML, encoding="utf-8")
    for name, text in {"train/loss.tsv": "step\tloss\n1\t3.0\n2\t2.0\n", "eval/loss.tsv": "step\tloss\n2\t2.5\n",
                       "lr.tsv": "step\tlr\n1\t0.1\n", "grad.tsv": "step\tgrad\n1\t0.5\n"}.items():
        (tmp_path / "curves" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "curves" / name).write_text(text, encoding="utf-8")
    (tmp_path / "decisions.json").write_text(json.dumps([{"actual": "yes", "predicted": "no"},
                                                         {"actual": "no", "predicted": "no"}]), encoding="utf-8")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return tmp_path


def test_plot_data_is_each_vega_plot_with_its_points_as_dvc_reads_them(project):
    found = {plot["title"]: plot for plot in plots.plot_data(root=project)}
    assert list(found) == ["Loss per step", "Learning rate", "curves/grad.tsv", "Decisions"]  # no image, no plot without data
    loss = found["Loss per step"]
    assert {k: v for k, v in loss.items() if k != "points"} == {
        "title": "Loss per step", "template": "linear", "x": "step", "y": "loss", "x_label": "step",
        "y_label": "loss (nats)"}
    assert [(p["rev"], p["filename"], p["step"], p["loss"]) for p in loss["points"]] == [
        ("workspace", "train/loss.tsv", "1", "3.0"), ("workspace", "train/loss.tsv", "2", "2.0"),
        ("workspace", "eval/loss.tsv", "2", "2.5")]
    assert (found["Learning rate"]["y"], found["Learning rate"]["points"][0]["lr"]) == ("lr", "0.1")
    grad = found["curves/grad.tsv"]  # no title: DVC's name for it; labels default to the fields
    assert (grad["template"], grad["x_label"], grad["y_label"]) == ("linear", "step", "grad")
    decisions = found["Decisions"]
    assert (decisions["template"], decisions["x"], decisions["y"]) == ("confusion", "actual", "predicted")
    assert (decisions["x_label"], decisions["y_label"]) == ("reference", "predicted")
    assert [(p["actual"], p["predicted"]) for p in decisions["points"]] == [("yes", "no"), ("no", "no")]
    assert decisions["classes"] == CLASSES  # eval.decision_options' order: metrics/report.md's rows and columns
    assert [title for title, plot in found.items() if "classes" in plot] == ["Decisions"]  # only a confusion plot


def test_a_confusion_plot_needs_params_yaml(project):
    (project / "params.yaml").unlink()
    with pytest.raises(UserError, match=r"params\.yaml: not found"):
        plots.plot_data(root=project)


def test_plot_data_reads_the_current_folder_by_default(project):
    found = plots.plot_data()
    assert [plot["title"] for plot in found] == ["Loss per step", "Learning rate", "curves/grad.tsv", "Decisions"]
    assert found[-1]["classes"] == CLASSES == plots.decision_classes()  # the current folder's params.yaml


def test_plot_data_of_revisions_holds_theirs_and_the_workspaces(project):
    import subprocess

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (project / ".dvc" / "config").write_text("", encoding="utf-8")  # made with no_scm: now in git
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=project, check=True)
    (project / "curves/lr.tsv").write_text("step\tlr\n1\t0.2\n", encoding="utf-8")
    subprocess.run([*git, "commit", "-qam", "head"], cwd=project, check=True)
    (project / "curves/lr.tsv").write_text("step\tlr\n1\t0.3\n", encoding="utf-8")
    found = {plot["title"]: plot for plot in plots.plot_data(["HEAD~1"], root=project)}  # not DVC's default HEAD
    assert sorted((p["rev"], p["lr"]) for p in found["Learning rate"]["points"]) == [("HEAD~1", "0.1"),
                                                                                      ("workspace", "0.3")]
    assert found["Decisions"]["classes"] == CLASSES


def test_outside_a_dvc_project_the_plots_cannot_be_read(tmp_path):
    with pytest.raises(UserError, match=r"^cannot read the plots: you are not inside of a DVC repository"):
        plots.plot_data(root=tmp_path)


def test_png_names_come_from_titles_and_file_paths():
    assert plots.file_name("ROUGE-L per test question, base (x) vs fine-tuned (y)") == (
        "rouge-l-per-test-question-base-x-vs-fine-tuned-y.png")
    assert plots.file_name("dvclive/train/plots/metrics/train/grad_norm.tsv") == "train-grad-norm.png"
    for suffix in ("tsv", "csv", "json", "yaml"):
        assert plots.file_name(f"metrics/eval_plots/decisions.{suffix}") == "metrics-eval-plots-decisions.png"
    assert plots.file_name("notes.txt") == "notes-txt.png"
    assert plots.file_name("a.tsv.bak") == "a-tsv-bak.png"  # only a last data suffix goes
    assert plots.file_name("  Über LOSS!! ") == "ber-loss.png"


def test_top_level_files_are_the_titles_dvc_yaml_declares(project):
    assert plots.top_level_files() == {"picture.png": "picture-png.png", "Loss per step": "loss-per-step.png",
                                       "curves/lr.tsv": "curves-lr.png", "Not written yet": "not-written-yet.png",
                                       "curves/grad.tsv": "curves-grad.png", "Decisions": "decisions.png"}
    (project / "other.yaml").write_text("stages: {}\n", encoding="utf-8")
    assert plots.top_level_files(project / "other.yaml") == {}
    assert plots.top_level_files(project / "absent.yaml") == {}


def test_series_are_per_revision_and_file_in_file_order():
    plot = {"x": "step", "y": "loss", "points": [
        {"step": "1", "loss": "3.0", "rev": "workspace", "filename": "train.tsv"},
        {"step": "1", "loss": "2.0", "rev": "main", "filename": "train.tsv"},
        {"step": "2", "loss": "2.5", "rev": "workspace", "filename": "train.tsv"},
        {"step": "2", "value": "1.5", "field": "value", "rev": "workspace", "filename": "eval.tsv"},
        {"step": "3", "loss": "1.0", "rev": "workspace"},
        {"step": "4", "loss": "0.5", "filename": "lone.tsv"},
        {"loss": "0.1"},
    ]}
    # several revisions and several files: both name a series; a missing key reads as an empty name
    assert plots._series(plot) == {"workspace train.tsv": [("1", "3.0"), ("2", "2.5")], "main train.tsv": [("1", "2.0")],
                                   "workspace eval.tsv": [("2", "1.5")], "workspace ": [("3", "1.0")],
                                   " lone.tsv": [("4", "0.5")], " ": [(None, "0.1")]}
    assert list(plots._series(plot))[:2] == ["workspace train.tsv", "main train.tsv"]


def _points(*rev_file_step):
    return [{"step": step, "loss": "1.0", "rev": rev, "filename": name} for rev, name, step in rev_file_step]


def test_series_are_labelled_only_by_what_tells_them_apart():
    one_revision = _points(("workspace", "train.tsv", "1"), ("workspace", "eval.tsv", "1"), ("workspace", "train.tsv", "2"))
    assert plots._series({"x": "step", "y": "loss", "points": one_revision}) == {
        "train.tsv": [("1", "1.0"), ("2", "1.0")], "eval.tsv": [("1", "1.0")]}  # the file, not the revision
    one_file = _points(("HEAD~1", "train.tsv", "1"), ("workspace", "train.tsv", "1"), ("HEAD~1", "train.tsv", "2"))
    assert plots._series({"x": "step", "y": "loss", "points": one_file}) == {
        "HEAD~1": [("1", "1.0"), ("2", "1.0")], "workspace": [("1", "1.0")]}  # the revision, not the file
    alone = _points(("workspace", "train.tsv", "1"), ("workspace", "train.tsv", "2"))
    assert plots._series({"x": "step", "y": "loss", "points": alone}) == {"workspace": [("1", "1.0"), ("2", "1.0")]}
    assert plots._series({"x": "step", "y": "loss", "points": [{"step": "1", "loss": "1.0"}]}) == {"": [("1", "1.0")]}


def test_numbers_or_none():
    assert plots._number("2.5") == 2.5 and plots._number(3) == 3.0
    assert plots._number("yes") is None and plots._number(None) is None


def _drawn(monkeypatch):
    """The figures draw() saves, kept for reading back their artists."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: (figures.append(self), save(self, *args, **kwargs)))
    return figures


def _plot(template, points, x="step", y="loss"):
    return {"title": "A title", "template": template, "x": x, "y": y, "x_label": "the x", "y_label": "the y",
            "points": points}


def test_lines_are_drawn_sorted_by_x_one_per_series(tmp_path, monkeypatch):
    figures = _drawn(monkeypatch)
    points = [{"step": s, "loss": v, "rev": r, "filename": "t.tsv"}
              for r, s, v in [("workspace", "2", "2.0"), ("workspace", "1", "3.0"), ("main", "1", "4.0")]]
    plots.draw(_plot("linear", points), tmp_path / "a.png")
    [figure] = figures
    axes = figure.axes[0]
    assert (axes.get_title(), axes.get_xlabel(), axes.get_ylabel()) == ("A title", "the x", "the y")
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_marker()) for line in axes.lines}
    assert lines == {"workspace": ([1.0, 2.0], [3.0, 2.0], "."), "main": ([1.0], [4.0], ".")}  # one file: not named
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["workspace", "main"]
    assert axes.xaxis.get_gridlines()[0].get_visible() and axes.xaxis.get_gridlines()[0].get_alpha() == 0.3
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
    assert tuple(figure.get_size_inches() * figure.dpi) == (700, 420)  # the size the report shows
    from PIL import Image

    with Image.open(tmp_path / "a.png") as png:  # no matplotlib version stamp: the same bytes on any version
        assert png.size == (700, 420) and "Software" not in png.info


def test_a_long_single_curve_has_no_markers_and_no_legend(tmp_path, monkeypatch):
    figures = _drawn(monkeypatch)
    plots.draw(_plot("linear", [{"step": str(s), "loss": str(1 / s)} for s in range(30, 0, -1)]), tmp_path / "a.png")
    axes = figures[0].axes[0]
    [line] = axes.lines
    assert line.get_marker() in (None, "None", "") and list(line.get_xdata()) == [float(s) for s in range(1, 31)]
    assert axes.get_legend() is None
    plots.draw(_plot("linear", [{"step": str(s), "loss": "1"} for s in range(29)]), tmp_path / "b.png")
    assert figures[1].axes[0].lines[0].get_marker() == "."


def test_scatter_plots_are_points_not_lines(tmp_path, monkeypatch):
    figures = _drawn(monkeypatch)
    points = [{"base": b, "fine_tuned": f, "rev": r} for r, b, f in [("workspace", "0.5", "0.25"),
                                                                     ("workspace", "0.1", "0.75"), ("main", "0.2", "0.2")]]
    plots.draw(_plot("scatter", points, x="base", y="fine_tuned"), tmp_path / "s.png")
    axes = figures[0].axes[0]
    ours, theirs = axes.collections
    assert ours.get_offsets().tolist() == [[0.5, 0.25], [0.1, 0.75]]  # in row order
    assert list(ours.get_sizes()) == [14] and theirs.get_offsets().tolist() == [[0.2, 0.2]]
    [diagonal] = axes.lines  # the one line: y = x across every value drawn, to read "better" from
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata()) == [0.1, 0.75]
    assert (diagonal.get_color(), diagonal.get_linestyle(), diagonal.get_linewidth()) == ("grey", "--", 1)
    said = "y = x: above, the y better; below, the x better"
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["workspace", "main", said]
    plots.draw(_plot("scatter", [], x="base", y="fine_tuned"), tmp_path / "empty.png")
    [diagonal] = figures[1].axes[0].lines  # nothing to span: the unit square's diagonal
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata()) == [0.0, 1.0]
    assert [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()] == [said]  # even one series: the line's legend


def test_categories_on_the_x_axis_are_scattered_by_name(tmp_path, monkeypatch):
    figures = _drawn(monkeypatch)
    points = [{"step": s, "loss": v, "rev": r} for r, s, v in [("workspace", "warmup", "2.0"), ("workspace", "end", "1.0"),
                                                               ("main", "end", "3.0")]]
    plots.draw(_plot("linear", points), tmp_path / "c.png")
    axes = figures[0].axes[0]
    collection = axes.collections[0]
    assert len(axes.lines) == 0 and [t.get_text() for t in axes.get_xticklabels()] == ["warmup", "end"]
    assert collection.get_offsets()[:, 1].tolist() == [2.0, 1.0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["workspace", "main"]


def _heatmap(axes) -> dict:
    """One heatmap panel read back from its artists: its labels, the image's counts, and each cell's text."""
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): (t.get_text(), t.get_color()) for t in axes.texts}
    return {"title": axes.get_title(), "rows": [t.get_text() for t in axes.get_yticklabels()],
            "columns": [t.get_text() for t in axes.get_xticklabels()], "counts": axes.images[0].get_array().tolist(),
            "texts": [[cells[i, j][0] for j in range(len(axes.get_xticklabels()))] for i in range(len(axes.get_yticklabels()))],
            "white": sorted(cell for cell, (_, color) in cells.items() if color == "white"),
            "colors": {color for _, color in cells.values()}, "axis_labels": (axes.get_ylabel(), axes.get_xlabel())}


def test_a_confusion_plot_is_a_heatmap_per_revision_rows_reference_columns_decision(tmp_path, monkeypatch):
    """Read as metrics/report.md's matrix: a row per reference label, a column per decision, in the classes'
    order (eval.decision_options'), the count in each cell; one panel per revision."""
    figures = _drawn(monkeypatch)
    pairs = [("yes", "yes")] * 4 + [("yes", "no"), ("no", "no"), ("no", "no"), ("maybe", "no")]
    points = [{"reference": a, "fine_tuned": p, "rev": "workspace", "filename": "d.json"} for a, p in pairs]
    points += [{"reference": "no", "fine_tuned": "yes", "rev": "main", "filename": "d.json"}]  # a second revision
    classes = ["yes", "no", "maybe"]  # not sorted: the order given is the order drawn
    plots.draw(_plot("confusion", points, x="reference", y="fine_tuned") | {"classes": classes}, tmp_path / "d.png")
    [figure] = figures
    ours, theirs, *bars = figure.axes
    assert [bar.get_label() for bar in bars] == ["<colorbar>"] * 2  # each heatmap has its colour bar
    assert figure.get_suptitle() == "A title"  # the plot's title above, each panel its revision's
    assert tuple(figure.get_size_inches() * figure.dpi) == (1050, 420)  # 1.5 + 4.5 inches a panel
    assert _heatmap(ours) == {
        "title": "workspace", "rows": classes, "columns": classes,
        "counts": [[4, 1, 0], [0, 2, 0], [0, 1, 0]],  # row: the reference, column: the decision
        "texts": [["4", "1", "0"], ["0", "2", "0"], ["0", "1", "0"]],
        "white": [(0, 0)],  # white above half the top count (4): 2 is not
        "colors": {"white", "black"}, "axis_labels": ("the x (rows)", "decision: the y (columns)")}
    assert _heatmap(theirs) == {
        "title": "main", "rows": classes, "columns": classes, "counts": [[0, 0, 0], [1, 0, 0], [0, 0, 0]],
        "texts": [["0", "0", "0"], ["1", "0", "0"], ["0", "0", "0"]], "white": [(1, 0)], "colors": {"white", "black"},
        "axis_labels": ("the x (rows)", "decision: the y (columns)")}
    for axes in (ours, theirs):
        assert axes.images[0].get_cmap().name == "Blues"  # dark at the top: the white counts stay readable
        assert axes.images[0].get_clim() == (0, max(max(row) for row in axes.images[0].get_array().tolist()))  # from 0
        assert {(t.get_ha(), t.get_va()) for t in axes.texts} == {("center", "center")}
        assert len(axes.lines) == 0 and axes.get_legend() is None
    assert (tmp_path / "d.png").read_bytes().startswith(b"\x89PNG")


def test_a_confusion_plot_of_one_revision_is_one_panel_under_the_plots_title(tmp_path, monkeypatch):
    figures = _drawn(monkeypatch)
    points = [{"reference": a, "fine_tuned": p, "rev": "workspace"} for a, p in [("yes", "unsure"), ("no", "no")]]
    plots.draw(_plot("confusion", points, x="reference", y="fine_tuned") | {"classes": ["yes", "no"]}, tmp_path / "d.png")
    [figure] = figures
    axes, bar = figure.axes
    assert bar.get_label() == "<colorbar>" and figure.get_suptitle() == ""
    assert tuple(figure.get_size_inches() * figure.dpi) == (600, 420)
    panel = _heatmap(axes)
    assert (panel["title"], panel["rows"], panel["columns"]) == ("A title", ["yes", "no", "unsure"], ["yes", "no", "unsure"])
    assert panel["counts"] == [[0, 0, 1], [0, 1, 0], [0, 0, 0]]  # a label outside the classes: its row and column after
    plots.draw(_plot("confusion", points, x="reference", y="fine_tuned"), tmp_path / "e.png")  # no classes given
    assert _heatmap(figures[1].axes[0])["rows"] == ["no", "unsure", "yes"]  # then every label, sorted


def test_render_replaces_the_folder_with_one_png_per_plot(tmp_path):
    out = tmp_path / "plots"
    out.mkdir()
    (out / "stale.png").write_bytes(b"old")
    points = [{"step": "1", "loss": "1.0"}]
    written = plots.render([_plot("linear", points) | {"title": "Train loss"},
                            _plot("linear", points) | {"title": "dvclive/x/plots/metrics/eval/loss.tsv"}], out)
    assert written == [out / "train-loss.png", out / "eval-loss.png"]
    assert sorted(p.name for p in out.iterdir()) == ["eval-loss.png", "train-loss.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]


def test_main_draws_dvc_yamls_plots_into_the_folder_given(project, monkeypatch):
    plots.main(["-o", str(project / "drawn")])
    assert sorted(p.name for p in (project / "drawn").iterdir()) == ["curves-grad.png", "decisions.png",
                                                                      "learning-rate.png", "loss-per-step.png"]
    asked = []
    monkeypatch.setattr(plots, "plot_data", lambda revisions: asked.append(revisions) or [])
    monkeypatch.setattr(plots, "render", lambda found, out: [])
    plots.main(["main", "v1"])
    plots.main([])
    assert asked == [["main", "v1"], []]
    assert plots.parse_args([]).out == Path("metrics/plots") and plots.parse_args(["-o", "d"]).out == Path("d")


def test_every_argument_is_explained_under_the_modules_first_line(capsys):
    from test_review_fast import help_entries

    description, entries = help_entries(plots.parse_args, capsys)
    assert description == plots.__doc__.splitlines()[0]
    assert set(entries) == {"revisions", "-h, --help", "-o OUT, --out OUT"}
    assert all(len(text) > 20 for text in entries.values()), entries
