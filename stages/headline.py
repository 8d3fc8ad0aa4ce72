"""The headline metrics: what a reviewer reads first, and which way is better.

The one list behind the pull-request comment and the experiment table (`python -m tools.review`):
rename a metric in its stage, then here. A metric missing from a revision shows as n/a.
"""

from __future__ import annotations

from typing import NamedTuple


class Headline(NamedTuple):
    file: str            # metrics file, as dvc.yaml declares it
    key: str             # dotted key inside it, as `dvc metrics show` prints it
    better: str          # "higher" or "lower"
    in_table: bool = True  # a column of `make exps`: 120 columns hold the experiment name, the changed
                           # params and about three of these (a column is as wide as its name)


HEADLINE = [
    Headline("metrics/eval.json", "tuned.test.rougeL", "higher"),
    Headline("metrics/eval.json", "tuned.test.decision_accuracy", "higher"),
    Headline("metrics/eval.json", "tuned.test.loss", "lower", in_table=False),
    # the fine-tuned minus the base model's ROUGE-L, with its bootstrap 95% interval
    Headline("metrics/eval.json", "delta.test.rougeL.delta", "higher", in_table=False),
    Headline("metrics/eval.json", "delta.test.rougeL.ci_low", "higher", in_table=False),
    Headline("metrics/eval.json", "delta.test.rougeL.ci_high", "higher", in_table=False),
    Headline("metrics/train.json", "train.loss", "lower"),
    Headline("metrics/train.json", "train.eval_loss_best", "lower", in_table=False),
]
