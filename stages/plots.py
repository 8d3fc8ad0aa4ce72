"""Plots: every plot dvc.yaml defines, as PNG files that open with no network.

    python -m stages.plots          (or: dvc repro plots)
    python -m stages.plots main -o /tmp/plots     (main's curves against the workspace's)

`dvc plots show` writes an HTML page that loads Vega from a CDN: blank on an offline server. This
stage reads the same data the same way (DVC's own plot definitions and data, as
`dvc plots diff REV... --json` gives them) and draws each plot with matplotlib into
metrics/plots/<name>.png, one line per revision and file. A confusion-matrix template becomes one
heatmap per revision, read as metrics/report.md's matrix (rows: reference, columns: decision, in
eval.decision_options order, counts in the cells); a scatter gets the y = x line. The PNGs are
git-tracked and byte-identical for identical data, so the report and the pull-request comment can
link them.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import defaultdict
from pathlib import Path

from stages import cli, paths
from stages.errors import UserError, stage_entrypoint
from stages.outputs import staged
from stages.params import load_params

log = logging.getLogger("stages.plots")


def plot_data(revisions: list[str] | None = None, root: Path = Path(".")) -> list[dict]:
    """Each plot of dvc.yaml as {title, template, x, y, x_label, y_label, points}, from DVC itself,
    and a confusion plot's `classes` in the report's order.

    With revisions, the points of those revisions and the workspace, as `dvc plots diff` gives them.
    """
    from dvc.exceptions import DvcException
    from dvc.render.match import match_defs_renderers
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            data = repo.plots.diff(revs=revisions) if revisions else repo.plots.show()
            renderers = match_defs_renderers(data=data, templates_dir=repo.plots.templates_dir)
    except DvcException as exc:
        raise UserError(f"cannot read the plots: {exc}") from None
    plots = []
    for found in renderers:
        renderer = found.renderer
        if renderer.TYPE != "vega" or not renderer.datapoints:
            continue  # image plots are files already
        props = renderer.properties
        plots.append({
            "title": props.get("title") or renderer.name,
            "template": props.get("template", "linear"),
            "x": props["x"], "y": props["y"],
            "x_label": props.get("x_label") or props["x"], "y_label": props.get("y_label") or props["y"],
            "points": renderer.datapoints,
        })
    for plot in plots:
        if plot["template"].startswith("confusion"):
            plot["classes"] = decision_classes(root)
    return plots


def decision_classes(root: Path = Path(".")) -> list[str]:
    """The decision labels in eval.decision_options order: metrics/report.md's row and column order."""
    return list(load_params(Path(root) / paths.PARAMS_FILE).eval.decision_options)


def file_name(title: str) -> str:
    """'Loss per optimizer step' -> loss-per-optimizer-step.png; dvclive/x/plots/metrics/eval/loss.tsv -> eval-loss.png."""
    name = title.split("/plots/metrics/")[-1]
    name = re.sub(r"\.(tsv|csv|json|yaml)$", "", name)
    return re.sub(r"[^0-9a-z]+", "-", name.lower()).strip("-") + ".png"


def top_level_files(dvc_yaml: Path = paths.DVC_YAML) -> dict[str, str]:
    """{title: PNG file name} of dvc.yaml's top-level plots, which this stage draws: for links to them.

    Empty without a dvc.yaml (a stage run outside a DVC project, as the benchmarks do).
    """
    import yaml

    if not Path(dvc_yaml).exists():
        return {}
    defined = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8")).get("plots") or []
    titles = [title for plot in defined for title in (plot if isinstance(plot, dict) else {plot: None})]
    return {title: file_name(title) for title in titles}


def _series(plot: dict) -> dict[str, list[tuple]]:
    """(x, y) points per revision and file, in file order, labelled by what tells them apart: the
    revision when several are drawn, the file when several are."""
    revisions = {point.get("rev", "") for point in plot["points"]}
    files = {point.get("filename", "") for point in plot["points"]}
    series = defaultdict(list)
    for point in plot["points"]:
        y = point.get(plot["y"], point.get(point.get("field", "")))
        tells = (("rev", len(revisions) > 1), ("filename", len(files) > 1))
        label = " ".join(point.get(key, "") for key, several in tells if several)
        series[label or point.get("rev", "")].append((point.get(plot["x"]), y))
    return series


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def draw(plot: dict, out_file: Path) -> None:
    import matplotlib.pyplot as plt

    drawn = figure(plot)
    # No 'Software' stamp: identical data gives identical bytes, whatever matplotlib's version.
    drawn.savefig(out_file, format="png", metadata={"Software": None})
    plt.close(drawn)


def figure(plot: dict):
    """The matplotlib figure of one plot, as `draw` saves it."""
    import matplotlib

    matplotlib.use("Agg")  # no display, no browser
    import matplotlib.pyplot as plt

    series = _series(plot)
    if plot["template"].startswith("confusion"):
        return _confusion_figure(plot, series)
    drawn, axes = plt.subplots(figsize=(7, 4.2), dpi=100)
    for label, points in series.items():
        xy = [(_number(x), _number(y)) for x, y in points]
        if not all(x is not None and y is not None for x, y in xy):  # a category on the x axis
            axes.scatter([str(x) for x, _ in points], [_number(y) for _, y in points], label=label)
        elif plot["template"].startswith("scatter"):  # one point per row, unconnected
            axes.scatter([x for x, _ in xy], [y for _, y in xy], s=14, label=label)
        else:
            xy.sort()
            axes.plot([x for x, _ in xy], [y for _, y in xy], marker="." if len(xy) < 30 else None, label=label)
    if plot["template"].startswith("scatter"):
        _diagonal(axes, plot, [_number(v) for points in series.values() for point in points for v in point])
    if len(series) > 1 or plot["template"].startswith("scatter"):
        axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    axes.set_title(plot["title"])
    axes.set_xlabel(plot["x_label"])
    axes.set_ylabel(plot["y_label"])
    drawn.tight_layout()
    return drawn


def _diagonal(axes, plot: dict, values: list) -> None:
    """y = x on a scatter of two models' per-question scores (higher is better, as ROUGE-L): a point
    above the line is a question the y model scores higher."""
    values = [v for v in values if v is not None] or [0.0, 1.0]
    low, high = min(values), max(values)
    axes.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1,
              label=f"y = x: above, {plot['y_label']} better; below, {plot['x_label']} better")


def _confusion_figure(plot: dict, series: dict):
    """One heatmap per revision, read as metrics/report.md's matrix: rows the reference (dvc.yaml's
    x), columns the decision (its y), the classes in eval.decision_options order (then any other,
    sorted) on both axes, so the diagonal is agreement even where a model never gives some label."""
    import matplotlib.pyplot as plt

    drawn, panels = plt.subplots(1, len(series), figsize=(1.5 + 4.5 * len(series), 4.2), dpi=100, squeeze=False)
    for axes, (label, points) in zip(panels[0], series.items()):
        classes = list(plot.get("classes", []))
        classes += sorted({str(value) for point in points for value in point} - set(classes))
        counts = [[sum(1 for x, y in points if str(x) == row and str(y) == column) for column in classes]
                  for row in classes]
        image = axes.imshow(counts, cmap="Blues", vmin=0)
        axes.set_xticks(range(len(classes)), classes)
        axes.set_yticks(range(len(classes)), classes)
        axes.set_ylabel(f"{plot['x_label']} (rows)")
        axes.set_xlabel(f"decision: {plot['y_label']} (columns)")
        top = max(max(row) for row in counts)
        for i, row in enumerate(counts):
            for j, count in enumerate(row):
                axes.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
        axes.set_title(label if len(series) > 1 else plot["title"])
        drawn.colorbar(image, ax=axes)
    if len(series) > 1:
        drawn.suptitle(plot["title"])
    drawn.tight_layout()
    return drawn


def render(plots: list[dict], out_dir: Path) -> list[Path]:
    """Draw every plot into out_dir (replaced as a whole); returns the PNG paths under out_dir."""
    names = [file_name(plot["title"]) for plot in plots]
    with staged() as out:
        folder = out.dir(out_dir)
        for plot, name in zip(plots, names):
            draw(plot, folder / name)
    return [Path(out_dir) / name for name in names]


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__spec__.name, __doc__)
    parser.add_argument("revisions", nargs="*", help="also draw these git revisions' data (as `dvc plots diff`)")
    parser.add_argument("-o", "--out", type=Path, default=paths.PLOTS_DIR, help="folder to write the PNGs to")
    return parser.parse_args(argv)


@stage_entrypoint
def main(argv=None) -> None:
    args = parse_args(argv)
    written = render(plot_data(args.revisions), args.out)
    log.info("wrote %d plots to %s: %s", len(written), args.out, ", ".join(p.name for p in written))


if __name__ == "__main__":
    main()
