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
    # the fine-tuned model on the test questions (metrics/eval.json, under `tuned`)
    Headline("metrics/eval.json", "tuned.test.accuracy", "higher"),  # yes/no/maybe decision accuracy
    Headline("metrics/eval.json", "tuned.test.rougeL", "higher"),
    Headline("metrics/eval.json", "tuned.test.loss", "lower", in_table=False),
    # fine-tuned minus base, with the paired bootstrap 95% interval (under `vs_base`)
    *(Headline("metrics/eval.json", f"vs_base.test.{name}.{part}", "higher", in_table=False)
      for name in ("accuracy", "rougeL") for part in ("delta", "ci_low", "ci_high")),
    # the base model: moves only when the evaluation itself changes (data, prompt, eval params)
    Headline("metrics/eval_base.json", "base.test.accuracy", "higher", in_table=False),
    Headline("metrics/eval_base.json", "base.test.rougeL", "higher", in_table=False),
    Headline("metrics/train.json", "train.loss", "lower"),
    Headline("metrics/train.json", "train.eval_loss_best", "lower", in_table=False),
]
