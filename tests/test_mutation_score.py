"""`make mutate`'s score table, from mutmut's result lines."""

from tools.mutation_score import scores, table

RESULTS = """\
    stages.records.x_clean_records__mutmut_1: killed
    stages.records.x_clean_records__mutmut_2: killed
    stages.records.x_split_rows__mutmut_3: survived
    stages.records.x_split_rows__mutmut_4: timeout
    stages.rouge.xǁRougeScorerǁdescribe__mutmut_8: survived
    stages.evaluation.x_answer_loss__mutmut_1: no tests
    stages.evaluation.x__batches__mutmut_2: killed
    stages.evaluation.x__batches__mutmut_3: skipped
"""


def test_the_score_counts_only_mutants_a_test_ran():
    by_module = scores(RESULTS.splitlines())
    assert list(by_module) == ["stages.evaluation", "stages.records", "stages.rouge"]
    assert by_module["stages.records"] == {"killed": 2, "survived": 1, "timeout": 1}
    assert by_module["stages.evaluation"] == {"killed": 1, "no tests": 1, "other": 1}
    lines = table(by_module).splitlines()
    assert lines[2] == "| stages.evaluation | 100.0% | 1 | 0 | 0 | 0 | 1 | 1 |"  # "no tests" is not a survivor
    assert lines[3] == "| stages.records | 75.0% | 2 | 1 | 1 | 0 | 0 | 0 |"  # a hang is detected too
    assert lines[4] == "| stages.rouge | 0.0% | 0 | 1 | 0 | 0 | 0 | 0 |"
