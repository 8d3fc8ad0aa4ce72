"""Fine-tuned minus base, with a paired bootstrap 95% interval over the test questions.

Both models answer the same questions, so the questions are resampled together: each resample
draws n question indices with replacement and measures both models on that draw. The interval
is the 2.5th to 97.5th percentile of the resampled differences. The generator is numpy's
PCG64 seeded from `seed`, fresh for each metric: the same predictions always give the same
intervals, and adding a metric never moves another one's interval.
"""

from __future__ import annotations

import numpy as np

from stages.decision import both_decided
from stages.rouge import ROUGE_TYPES

CHUNK = 1000  # resamples drawn at a time: bounds memory at CHUNK x n indices


def _ratio(values: np.ndarray, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return values[idx].sum(axis=-1) / weights[idx].sum(axis=-1)


def paired_bootstrap(tuned, base, *, samples: int, seed: int, tuned_weights=None, base_weights=None) -> dict:
    """{"delta", "ci_low", "ci_high"} of sum(tuned) / sum(tuned_weights) - the same for base.

    Without weights the statistic is the mean. With weights (token counts) it is a per-token
    mean, as the answer loss is: the sum of negative log-likelihoods over the sum of tokens.
    """
    tuned, base = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if tuned.shape != base.shape or tuned.ndim != 1 or len(tuned) == 0:
        raise ValueError(f"need two equally long, non-empty lists of per-question values; got {tuned.shape}, {base.shape}")
    ones = np.ones_like(tuned)
    tuned_weights = ones if tuned_weights is None else np.asarray(tuned_weights, dtype=np.float64)
    base_weights = ones if base_weights is None else np.asarray(base_weights, dtype=np.float64)
    everything = np.arange(len(tuned))
    delta = _ratio(tuned, tuned_weights, everything) - _ratio(base, base_weights, everything)
    rng = np.random.default_rng(seed)
    resampled = []
    for start in range(0, samples, CHUNK):
        idx = rng.integers(0, len(tuned), size=(min(CHUNK, samples - start), len(tuned)))
        resampled.append(_ratio(tuned, tuned_weights, idx) - _ratio(base, base_weights, idx))
    low, high = np.percentile(np.concatenate(resampled), [2.5, 97.5])
    return {"delta": float(delta), "ci_low": float(low), "ci_high": float(high)}


def paired_deltas(records: list[dict], samples: int, seed: int) -> dict[str, dict]:
    """Per headline test metric, fine-tuned minus base over side-by-side records (see report.side_by_side)."""
    run = lambda tuned, base, **weights: paired_bootstrap(tuned, base, samples=samples, seed=seed, **weights)  # noqa: E731
    deltas = {"loss": run([r["answer_nll"] for r in records], [r["base_answer_nll"] for r in records],
                          tuned_weights=[r["answer_tokens"] for r in records],
                          base_weights=[r["base_answer_tokens"] for r in records])}
    for name in ROUGE_TYPES:
        deltas[name] = run([r[name] for r in records], [r[f"base_{name}"] for r in records])
    decided = both_decided(records)
    if decided:
        deltas["accuracy"] = run([float(r["decision"] == r["reference_decision"]) for r in decided],
                                 [float(r["base_decision"] == r["reference_decision"]) for r in decided])
    return deltas
