"""The headline metrics: what a reviewer reads first, which way is better, and the verdict rule.

The one list behind the pull-request comment and the experiment table (`python -m tools.review`):
rename a metric in its stage, then here. A metric missing from a revision shows as n/a.
`verdict` is the one rule the report and the comment use to call a change better or worse.
"""

from __future__ import annotations

import math
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


NO_INTERVAL = "no interval"
UNCLEAR = "no clear change"


def verdict(interval: dict | None, better: str) -> str:
    """"better" / "worse" only when a paired bootstrap 95% interval of the change excludes 0.

    `interval`: {"delta", "ci_low", "ci_high"} of new minus old (fine-tuned minus base, or this
    revision minus another), None when there is none; `better`: "higher" or "lower". An interval
    that touches or spans 0 is "no clear change", whatever the sign of the point change: on a
    few questions a change of either sign is often chance. Without an interval: "no interval".
    """
    low, high = (interval or {}).get("ci_low"), (interval or {}).get("ci_high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        return NO_INTERVAL
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', not {better!r}")
    if low <= 0 <= high:
        return UNCLEAR
    return "better" if (low > 0) == (better == "higher") else "worse"
