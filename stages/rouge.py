"""ROUGE that works on Korean: rouge_score's scorer with a Korean-aware tokenizer.

rouge_score's default tokenizer keeps only [a-z0-9], so every Hangul answer would score 0; it is
never used here. The scores are the plain mean of per-example F1 (no bootstrap): the same
predictions always give the same number.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

from stages.errors import UserError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# Kiwi's punctuation and symbol tags: sentence marks, commas, brackets, ellipsis, dashes, others.
KIWI_PUNCTUATION_TAGS = {"SF", "SP", "SS", "SSO", "SSC", "SE", "SO", "SW", "SB"}
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    # NFKC folds full-width digits and letters and compatibility jamo; case is not meaning.
    return unicodedata.normalize("NFKC", text).lower()


@lru_cache(maxsize=1)
def _kiwi():
    from kiwipiepy import Kiwi

    return Kiwi()


class KoreanTokenizer:
    """The `tokenize(text) -> list[str]` object that rouge_score's RougeScorer accepts."""

    def __init__(self, kind: str = "morpheme"):
        if kind not in ("morpheme", "whitespace", "char"):
            raise ValueError(f"unknown ROUGE tokenizer {kind!r}")
        self.kind = kind

    def tokenize(self, text: str) -> list[str]:
        text = normalize(text)
        if self.kind == "morpheme":
            return [t.form for t in _kiwi().tokenize(text) if t.tag not in KIWI_PUNCTUATION_TAGS]
        words = _PUNCTUATION.sub(" ", text).split()
        if self.kind == "whitespace":
            return words
        return [char for word in words for char in word]


class RougeScorer:
    def __init__(self, kind: str = "morpheme"):
        from rouge_score import rouge_scorer

        self.kind = kind
        self._scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=KoreanTokenizer(kind))

    def score(self, reference: str, prediction: str) -> dict[str, float]:
        scores = self._scorer.score(reference, prediction)
        return {name: scores[name].fmeasure for name in ROUGE_TYPES}

    def describe(self) -> dict[str, str]:
        """What produced the numbers, so two runs' ROUGE are known to be comparable."""
        info = {"tokenizer": self.kind, "rouge_score": _version("rouge-score")}
        if self.kind == "morpheme":
            info.update(kiwipiepy=_version("kiwipiepy"), kiwipiepy_model=_version("kiwipiepy_model"))
        return info


def mean_scores(per_example: list[dict[str, float]]) -> dict[str, float]:
    if not per_example:  # a mean over nothing is no score; 0.0 would read as a measured result
        raise UserError("no answers to score with ROUGE: the test split is empty; rerun `dvc repro prepare`")
    return {name: sum(s[name] for s in per_example) / len(per_example) for name in ROUGE_TYPES}


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
