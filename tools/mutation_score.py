"""Mutation score per module, from mutmut's results (`make mutate` prints it).

    mutmut results --all true | python -m tools.mutation_score

The score is detected / scored: a mutant is detected when a test failed on it or it hung (timeout),
scored when a selected test ran on it at all (killed, timeout, survived, suspicious).
Mutants of functions no selected test calls ("no tests": the model-bound functions of
stages/evaluation.py and the like) are counted apart, not as survivors: the tiny-model tests in
`make test` cover them, too slowly to run once per mutant.
"""

from __future__ import annotations

import re
import sys

from stages.cli import no_arguments
from collections import Counter, defaultdict

# "    stages.records.x_clean_records__mutmut_12: killed" (methods: "stages.rouge.xǁClassǁmethod__mutmut_3")
RESULT = re.compile(r"^\s*(?P<module>[\w.]+?)\.x[_ǁ]\S*__mutmut_\d+: (?P<status>.+?)\s*$")
COLUMNS = ("killed", "survived", "timeout", "suspicious", "no tests", "other")
SCORED = ("killed", "survived", "timeout", "suspicious")


def scores(lines) -> dict[str, Counter]:
    by_module = defaultdict(Counter)
    for line in lines:
        match = RESULT.match(line)
        if match:
            status = match["status"] if match["status"] in COLUMNS else "other"  # skipped, not checked, ...
            by_module[match["module"]][status] += 1
    return dict(sorted(by_module.items()))


def table(by_module: dict[str, Counter]) -> str:
    rows = ["| module | score | " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * (len(COLUMNS) + 1)]
    for module, counts in by_module.items():
        tested = sum(counts[status] for status in SCORED)
        score = f"{100 * (counts['killed'] + counts['timeout']) / tested:.1f}%" if tested else "n/a"
        rows.append(f"| {module} | {score} | " + " | ".join(str(counts[s]) for s in COLUMNS) + " |")
    return "\n".join(rows)


def main() -> None:
    by_module = scores(sys.stdin)
    if not by_module:
        raise SystemExit("no mutmut results on stdin: run `mutmut run` first")
    print(table(by_module))


if __name__ == "__main__":
    no_arguments(__spec__.name, __doc__)
    main()
