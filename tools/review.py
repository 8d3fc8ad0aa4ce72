"""The pull-request comment: what this revision changes against a base, as one markdown page.

    python -m tools.review BASE [--out review.md] [--plots-dir DIR] [--link-base URL]
    python -m tools.review --experiments       (the experiment table, headline columns only)
    make review BASE=main                      make exps

The comment holds the params diff (`dvc params diff --md BASE`), the headline metrics of
stages/headline.py with the way each should move, every other changed metric (cost included)
folded away, the summary table of metrics/report.md, and the plots: links to metrics/plots/*.png
and, with --plots-dir, PNGs of BASE's and this revision's curves drawn together. Metrics, curves
and the report are in git, so it needs no GPU and no DVC remote;
.github/workflows/review.yml posts it on every pull request.

Verdicts follow stages.headline.verdict, as the report's do: a test metric of either model gets a
paired bootstrap interval of this revision minus BASE over the questions both revisions'
metrics/predictions.jsonl answer (from git), and "better" / "worse" only when it excludes 0; a
metric without per-question data (the train losses) says "no interval". Fine-tuned minus base
within each revision (the `vs_base` intervals) is a table of its own.

`--experiments` is `dvc exp show --only-changed` without the columns that push the changed params
off a 120-column screen: every metric not marked for the table in stages/headline.py, the
dependency hashes, the creation time and the queue's state and executor.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from stages import cli, paths
from stages.errors import UserError, stage_entrypoint
from stages.headline import HEADLINE, verdict


def dvc(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise UserError(f"`dvc {' '.join(args)}` failed: {lines[-1]}")
    return result.stdout


def metric_values(base: str) -> dict[tuple[str, str], tuple]:
    """(file, key) -> (value at base, value here) for every metric of either revision."""
    diff = json.loads(dvc("metrics", "diff", base, "--all", "--json") or "{}")
    return {(file, key): (change.get("old"), change.get("new"))
            for file, changes in diff.items() for key, change in changes.items()}


def _number(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4f}"
    return str(value)


def _interval(interval: dict) -> str:
    return f"[{interval['ci_low']:+.4f}, {interval['ci_high']:+.4f}]"


def _predictions_at(base: str) -> list[dict] | None:
    """BASE's metrics/predictions.jsonl, from git (it is committed with dvc.lock), or None."""
    result = subprocess.run(["git", "show", f"{base}:./{paths.PREDICTIONS.as_posix()}"], capture_output=True,
                            text=True)
    if result.returncode != 0:
        return None
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _as_base_model(record: dict) -> dict:
    """A side-by-side record's base-model fields, named as the fine-tuned model's are."""
    from stages.report import MODEL_FIELDS

    return {"id": record["id"], "reference_decision": record.get("reference_decision"),
            **{field: record.get(f"base_{field}") for field in MODEL_FIELDS}}


def revision_intervals(base: str) -> dict[str, dict]:
    """Headline key -> paired bootstrap interval of this revision minus BASE, per test question.

    From both revisions' metrics/predictions.jsonl: `tuned.test.*` from the fine-tuned model's
    answers, `base.test.*` from the base model's. Empty for a model whose answers either revision
    lacks or holds for other questions: no pairs, no interval. Resamples and seed from params.yaml.
    """
    old = _predictions_at(base)
    if old is None or not paths.PREDICTIONS.exists():
        return {}
    from stages.bootstrap import paired_deltas
    from stages.outputs import read_jsonl
    from stages.params import load_params
    from stages.report import side_by_side

    new, params = read_jsonl(paths.PREDICTIONS), load_params()
    intervals = {}
    for model, fields in (("tuned", dict), ("base", _as_base_model)):
        try:
            pairs = side_by_side([fields(r) for r in new], [fields(r) for r in old])
            deltas = paired_deltas(pairs, params.eval.bootstrap_samples, params.seed)
        except (KeyError, TypeError, ValueError):  # other questions, or records of an older format
            continue
        intervals.update({f"{model}.test.{name}": interval for name, interval in deltas.items()})
    return intervals


def _is_vs_base(metric) -> bool:
    return metric.key.startswith("vs_base.")


def headline_table(values: dict, base: str, intervals: dict[str, dict]) -> str:
    """Each revision's headline metrics; the change with its interval and verdict where there is one."""
    lines = [f"| metric | {base} | this revision | change [95% interval] | verdict |",
             "| --- | ---: | ---: | ---: | --- |"]
    for metric in (m for m in HEADLINE if not _is_vs_base(m)):
        old, new = values.get((metric.file, metric.key), (None, None))
        interval = intervals.get(metric.key)
        if interval is not None:  # the paired change: over the questions both revisions answered
            change = f"{interval['delta']:+.4f} {_interval(interval)}"
        else:
            change = f"{new - old:+.4f}" if isinstance(old, (int, float)) and isinstance(new, (int, float)) else "n/a"
        lines.append(f"| `{metric.key}` ({metric.better} is better) | {_number(old)} | {_number(new)} | {change} "
                     f"| {verdict(interval, metric.better)} |")
    return "\n".join(lines)


def within_revisions_table(values: dict, base: str) -> str:
    """Fine-tuned minus base as each revision measured it (its `vs_base` interval), with its verdict."""
    lines = [f"| fine-tuned minus base | {base} | this revision |", "| --- | --- | --- |"]
    for metric in (m for m in HEADLINE if _is_vs_base(m) and m.key.endswith(".delta")):
        stem, cells = metric.key.removesuffix(".delta"), []
        for side in (0, 1):  # BASE, this revision
            interval = {part: values.get((metric.file, f"{stem}.{part}"), (None, None))[side]
                        for part in ("delta", "ci_low", "ci_high")}
            said = verdict(interval, metric.better)
            shown = "" if said == "no interval" else f" {_interval(interval)}"
            cells.append("n/a" if interval["delta"] is None else f"{interval['delta']:+.4f}{shown}: {said}")
        lines.append(f"| `{stem}` ({metric.better} is better) | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def report_summary(report: Path = paths.REPORT) -> str | None:
    """The first table of the evaluation report (its base vs fine-tuned summary)."""
    if not report.exists():
        return None
    lines = report.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        return None
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def plots_section(base: str, link_base: str, plots_dir: Path | None) -> list[str]:
    lines = []
    committed = sorted(paths.PLOTS_DIR.glob("*.png"))
    if committed:
        prefix = f"{link_base.rstrip('/')}/" if link_base else ""
        lines.append("This revision: " + ", ".join(f"[{p.stem}]({prefix}{p.as_posix()})" for p in committed))
    if plots_dir is not None:
        from stages.plots import plot_data, render

        lines.append("")
        lines += [f"![{png.stem}]({png.as_posix()})" for png in render(plot_data([base]), plots_dir)]
    return lines or ["No plots in this revision (`dvc repro` draws them into metrics/plots/)."]


def comment(base: str, link_base: str = "", plots_dir: Path | None = None) -> str:
    values = metric_values(base)
    headline = {(m.file, m.key) for m in HEADLINE}
    changed = {k: v for k, v in values.items() if k not in headline and v[0] != v[1]}
    params = dvc("params", "diff", base, "--md").strip() or f"No params changed against {base}."
    lines = [f"## Review against {base}", "", "### Headline metrics", "",
             headline_table(values, base, revision_intervals(base)), "",
             "Change = this revision minus " + base + "; the interval is a paired bootstrap over the test questions "
             "both revisions answered: better / worse only when it excludes 0.", "",
             within_revisions_table(values, base), "", "### Params", "", params, ""]
    if changed:
        lines += [f"<details><summary>{len(changed)} other metrics changed (quality and cost)</summary>", "",
                  "| file | metric | " + base + " | this revision |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {file} | `{key}` | {_number(old)} | {_number(new)} |"
                  for (file, key), (old, new) in sorted(changed.items())]
        lines += ["", "</details>", ""]
    summary = report_summary()
    lines += ["### Evaluation report", "", summary or f"No table in {paths.REPORT}.", ""]
    lines += ["### Plots", "", *plots_section(base, link_base, plots_dir)]
    return "\n".join(lines) + "\n"


def flatten(data, prefix="") -> list[str]:
    if not isinstance(data, dict):
        return [prefix]
    return [key for name, value in data.items() for key in flatten(value, f"{prefix}{name}" if not prefix
                                                                  else f"{prefix}.{name}")]


def experiment_columns() -> tuple[set[str], set[str]]:
    """Every metric column name (bare and path-qualified) and dependency column of `dvc exp show`."""
    metrics, deps = set(), set()

    def visit(node):
        if isinstance(node, list):
            for item in node:
                visit(item)
        elif isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "metrics" in data:
                for file, found in (data.get("metrics") or {}).items():
                    for key in flatten((found or {}).get("data") or {}):
                        metrics.update({key, f"{file}:{key}"})
                deps.update(data.get("deps") or {})
            for value in node.values():
                visit(value)

    visit(json.loads(dvc("exp", "show", "--json")))
    return metrics, deps


def show_experiments(extra: list[str]) -> None:
    metrics, deps = experiment_columns()
    keep = {m.key for m in HEADLINE if m.in_table} | {f"{m.file}:{m.key}" for m in HEADLINE if m.in_table}
    # the time and the queue columns too: `dvc queue status` tells how a queued run went
    drop = sorted((metrics - keep) | deps | {"Created", "State", "Executor"})
    pattern = "^(" + "|".join(re.escape(name) for name in drop) + ")$"
    subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--only-changed", "--no-pager",
                    "--drop", pattern, *extra], check=False)


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(__spec__.name, __doc__)
    parser.add_argument("base", nargs="?", help="git revision to compare with (e.g. main, origin/main)")
    parser.add_argument("--out", type=Path, help="write the comment here (default: print it)")
    parser.add_argument("--plots-dir", type=Path, help="also draw BASE's and this revision's plots together here")
    parser.add_argument("--link-base", default="", help="URL the metrics/plots links start with (default: relative)")
    parser.add_argument("--experiments", action="store_true", help="print the experiment table instead")
    return parser.parse_known_args(argv)


@stage_entrypoint
def main(argv=None) -> None:
    args, extra = parse_args(argv)
    if args.experiments:
        show_experiments(extra)
        return
    if extra:  # only the experiment table passes options on (to `dvc exp show`)
        raise UserError(f"unrecognized arguments: {' '.join(extra)}; see `python -m tools.review --help`")
    if args.base is None:
        raise UserError("give the revision to compare with: python -m tools.review main")
    text = comment(args.base, args.link_base, args.plots_dir)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
