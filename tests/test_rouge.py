"""ROUGE on Korean, with values worked out by hand."""

import pytest
from rouge_score import rouge_scorer

from stages.errors import UserError
from stages.rouge import KoreanTokenizer, RougeScorer, mean_scores

REFERENCE = "고혈압 환자에서 운동은 혈압을 낮춘다"


@pytest.mark.parametrize("kind", ["morpheme", "whitespace", "char"])
def test_identical_is_one_and_disjoint_is_zero(kind):
    scorer = RougeScorer(kind)
    assert scorer.score(REFERENCE, REFERENCE) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert scorer.score(REFERENCE, "폐렴 백신 접종률") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_partial_overlap_by_hand_whitespace():
    # reference words: 고혈압 환자에서 운동은 혈압을 낮춘다 (5); prediction: 운동은 혈압을 낮춘다 (3).
    # ROUGE-1: 3 shared, P = 3/3, R = 3/5, F = 0.75. ROUGE-2: 2 of the prediction's 2 bigrams, of the
    # reference's 4: P = 1, R = 1/2, F = 2/3. ROUGE-L: LCS 3, as ROUGE-1: 0.75.
    scores = RougeScorer("whitespace").score(REFERENCE, "운동은 혈압을 낮춘다.")
    assert scores == pytest.approx({"rouge1": 0.75, "rouge2": 2 / 3, "rougeL": 0.75})


def test_partial_overlap_by_hand_morpheme():
    tokenizer = KoreanTokenizer("morpheme")
    assert tokenizer.tokenize("운동은 혈압을 낮춘다.") == ["운동", "은", "혈압", "을", "낮추", "ᆫ다"]
    assert tokenizer.tokenize(REFERENCE) == ["고", "혈압", "환자", "에서", "운동", "은", "혈압", "을", "낮추", "ᆫ다"]
    # The prediction's 6 morphemes all appear, in order, among the reference's 10. ROUGE-1 =
    # ROUGE-L: P = 1, R = 6/10, F = 0.75. ROUGE-2: its 5 bigrams are all among the reference's 9:
    # P = 1, R = 5/9, F = 2 * 5/9 / (1 + 5/9) = 5/7.
    scores = RougeScorer("morpheme").score(REFERENCE, "운동은 혈압을 낮춘다.")
    assert scores == pytest.approx({"rouge1": 0.75, "rouge2": 5 / 7, "rougeL": 0.75})


def test_char_and_whitespace_tokenizers_score_differently_by_hand():
    # Words: 혈압을 낮춘다 / 혈압이 낮다 share none, so every whitespace score is 0. Characters: the
    # reference has 6 (혈 압 을 낮 춘 다), the prediction 5 (혈 압 이 낮 다); 4 shared, in order.
    # ROUGE-1 = ROUGE-L: P = 4/5, R = 4/6, F = 8/11. ROUGE-2: 혈압 is the one shared bigram of the
    # prediction's 4 and the reference's 5: P = 1/4, R = 1/5, F = 2/9.
    reference, prediction = "혈압을 낮춘다", "혈압이 낮다"
    assert KoreanTokenizer("char").tokenize(reference) == ["혈", "압", "을", "낮", "춘", "다"]
    assert KoreanTokenizer("whitespace").tokenize(reference) == ["혈압을", "낮춘다"]
    assert RougeScorer("whitespace").score(reference, prediction) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert RougeScorer("char").score(reference, prediction) == pytest.approx(
        {"rouge1": 8 / 11, "rouge2": 2 / 9, "rougeL": 8 / 11})


def test_an_unknown_tokenizer_is_refused():
    with pytest.raises(ValueError, match="unknown ROUGE tokenizer 'default'"):
        KoreanTokenizer("default")


@pytest.mark.parametrize("kind", ["morpheme", "whitespace", "char"])
def test_hangul_is_never_dropped(kind):
    tokens = KoreanTokenizer(kind).tokenize("비타민 D 보충은 골절을 줄인다, 유의하게!")
    assert any("\uac00" <= ch <= "\ud7a3" for token in tokens for ch in token)
    assert not any(token in {",", "!", "."} for token in tokens)
    # The failure this guards against: rouge_score's own tokenizer sees no Hangul at all.
    default = rouge_scorer.RougeScorer(["rouge1"]).score(REFERENCE, REFERENCE)["rouge1"].fmeasure
    assert default == 0.0 and RougeScorer(kind).score(REFERENCE, REFERENCE)["rouge1"] == 1.0


def test_normalisation_folds_width_and_case():
    tokenizer = KoreanTokenizer("whitespace")
    assert tokenizer.tokenize("ＣＯＶＩＤ １９ 환자") == tokenizer.tokenize("covid 19 환자") == ["covid", "19", "환자"]


def test_morphemes_are_the_default():
    assert KoreanTokenizer().kind == "morpheme" and RougeScorer().kind == "morpheme"


def test_the_mean_is_the_plain_mean_of_examples():
    per_example = [{"rouge1": 1.0, "rouge2": 0.5, "rougeL": 1.0}, {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.5}]
    assert mean_scores(per_example) == {"rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.75}


def test_the_mean_of_no_examples_is_an_error_not_a_zero_score():
    with pytest.raises(UserError, match="^no answers to score with ROUGE: the test split is empty; "
                                        "rerun `dvc repro prepare`$") as error:
        mean_scores([])
    assert "\n" not in str(error.value)


def test_the_scorer_records_what_produced_the_numbers():
    from importlib.metadata import version

    assert RougeScorer("morpheme").describe() == {
        "tokenizer": "morpheme", "rouge_score": version("rouge-score"), "kiwipiepy": version("kiwipiepy"),
        "kiwipiepy_model": version("kiwipiepy_model")}
    assert RougeScorer("char").describe() == {"tokenizer": "char", "rouge_score": version("rouge-score")}
    assert "unknown" not in RougeScorer("morpheme").describe().values()


def test_a_package_without_metadata_is_unknown():
    from stages.rouge import _version

    assert _version("no-such-package-for-this-test") == "unknown"
