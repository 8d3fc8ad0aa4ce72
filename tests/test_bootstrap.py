"""The paired bootstrap: known answers, determinism, and the deltas the evaluate stage writes."""

import numpy as np
import pytest

from stages.bootstrap import paired_bootstrap, paired_deltas


def _values(n=50, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, n)


def test_identical_models_give_exactly_zero_with_zero_width():
    base = _values()
    assert paired_bootstrap(base, base.copy(), samples=1000, seed=3407) == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    tokens = np.arange(1, 51)
    assert paired_bootstrap(base * tokens, base * tokens, samples=500, seed=0, tuned_weights=tokens,
                            base_weights=tokens) == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_a_constant_shift_gives_that_shift_with_zero_width():
    # Multiples of 1/8, 32 questions: sums and means are exact in binary, so is the shift.
    base = np.random.default_rng(2).integers(0, 8, 32) / 8
    assert paired_bootstrap(base + 0.25, base, samples=1000, seed=3407) == {
        "delta": 0.25, "ci_low": 0.25, "ci_high": 0.25}
    # Any per-question values: the same, to rounding. An unpaired bootstrap would give a wide interval.
    shifted = paired_bootstrap(_values() - 0.1, _values(), samples=1000, seed=3407)
    assert shifted == pytest.approx({"delta": -0.1, "ci_low": -0.1, "ci_high": -0.1}, abs=1e-12)


def test_a_per_token_shift_of_the_loss_is_found_with_weights():
    tokens = np.random.default_rng(3).integers(5, 200, 30).astype(float)
    base_nll = tokens * np.random.default_rng(4).uniform(1.0, 3.0, 30)
    result = paired_bootstrap(base_nll - 0.5 * tokens, base_nll, samples=1000, seed=1,
                              tuned_weights=tokens, base_weights=tokens)
    assert result == pytest.approx({"delta": -0.5, "ci_low": -0.5, "ci_high": -0.5}, abs=1e-12)
    # The statistic is the per-token mean (sum over sum), not the mean of per-question means.
    unweighted = paired_bootstrap(base_nll - 0.5 * tokens, base_nll, samples=100, seed=1)
    assert unweighted["delta"] == pytest.approx(-0.5 * tokens.mean())


def test_the_interval_is_seeded_and_brackets_the_observed_difference():
    base = _values(seed=5)
    tuned = base + np.random.default_rng(6).normal(0.05, 0.2, 50)
    first = paired_bootstrap(tuned, base, samples=2000, seed=3407)
    assert first == paired_bootstrap(tuned, base, samples=2000, seed=3407)
    assert first != paired_bootstrap(tuned, base, samples=2000, seed=3408)
    assert first["delta"] == pytest.approx(np.mean(tuned - base))
    assert first["ci_low"] < first["delta"] < first["ci_high"]
    # The normal approximation's standard error, sd / sqrt(n), sets the interval's width.
    half_width = 1.96 * np.std(tuned - base, ddof=1) / np.sqrt(50)
    assert (first["ci_high"] - first["ci_low"]) / 2 == pytest.approx(half_width, rel=0.15)


def test_more_resamples_than_one_chunk_are_all_used():
    base, tuned = _values(seed=7), _values(seed=8)
    many = paired_bootstrap(tuned, base, samples=2500, seed=0)
    fewer = paired_bootstrap(tuned, base, samples=1000, seed=0)
    assert many["delta"] == fewer["delta"] and many["ci_low"] != fewer["ci_low"]
    # exactly as many as asked: the last, partial chunk is not drawn whole
    more = paired_bootstrap(tuned, base, samples=3000, seed=0)
    assert (many["ci_low"], many["ci_high"]) != (more["ci_low"], more["ci_high"])


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match=r"equally long, non-empty lists .*; got \(2,\), \(1,\)"):
        paired_bootstrap([1.0, 2.0], [1.0], samples=100, seed=0)
    with pytest.raises(ValueError, match=r"non-empty"):
        paired_bootstrap([], [], samples=100, seed=0)


def _record(i, rouge, base_rouge, decision, base_decision, reference="yes"):
    return {"id": str(i), "answer_nll": 2.0 * (i + 1), "answer_tokens": i + 1, "base_answer_nll": 3.0 * (i + 1),
            "base_answer_tokens": i + 1, "rouge1": rouge, "rouge2": rouge, "rougeL": rouge,
            "base_rouge1": base_rouge, "base_rouge2": base_rouge, "base_rougeL": base_rouge,
            "reference_decision": reference, "decision": decision, "base_decision": base_decision}


def test_paired_deltas_cover_every_headline_metric_and_skip_undecided_rows():
    records = [_record(0, 0.5, 0.25, "yes", "no"), _record(1, 0.75, 0.5, "yes", "yes"),
               _record(2, 0.5, 0.25, "no", "no"), _record(3, 0.5, 0.25, None, None, reference=None)]
    deltas = paired_deltas(records, samples=200, seed=0)
    assert set(deltas) == {"loss", "rouge1", "rouge2", "rougeL", "accuracy"}
    assert deltas["loss"] == {"delta": -1.0, "ci_low": -1.0, "ci_high": -1.0}  # 2 vs 3 nats per token
    assert deltas["rougeL"] == {"delta": 0.25, "ci_low": 0.25, "ci_high": 0.25}
    # Accuracy over the three decided rows: 2/3 fine-tuned, 1/3 base.
    assert deltas["accuracy"]["delta"] == pytest.approx(1 / 3)
    assert deltas["accuracy"]["ci_low"] == 0.0 and deltas["accuracy"]["ci_high"] == 1.0
    no_decisions = [dict(r, decision=None) for r in records]
    assert "accuracy" not in paired_deltas(no_decisions, samples=200, seed=0)


def test_the_interval_is_the_central_95_percent_of_the_resampled_differences():
    # A symmetric spread of 401 differences: the resampled mean is close to normal, so the 2.5th and
    # 97.5th percentiles sit at -/+1.96 standard errors; a 3.5th percentile would sit at -1.81.
    differences = np.linspace(-1.0, 1.0, 401)
    standard_error = np.std(differences) / np.sqrt(len(differences))
    result = paired_bootstrap(differences, np.zeros_like(differences), samples=20_000, seed=11)
    assert result["delta"] == pytest.approx(0.0, abs=1e-12)
    assert result["ci_low"] / standard_error == pytest.approx(-1.96, abs=0.06)
    assert result["ci_high"] / standard_error == pytest.approx(1.96, abs=0.06)


def test_paired_deltas_are_seeded_from_the_run_seed():
    rng = np.random.default_rng(2)
    records = [_record(i, *rng.uniform(0, 1, 2), "yes", "no" if i % 3 else "yes") for i in range(30)]
    first = paired_deltas(records, samples=500, seed=3407)
    assert first == paired_deltas(records, samples=500, seed=3407)  # the same run, the same intervals
    assert first["rougeL"] != paired_deltas(records, samples=500, seed=1)["rougeL"]
