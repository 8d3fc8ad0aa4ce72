"""Reading, cleaning and splitting rows (pure functions, no model)."""

import json
import unicodedata
from collections import Counter

import pandas as pd
import pytest

from stages.errors import UserError
from stages.records import clean_records, content_hash, read_records, split_counts, split_rows


def test_every_local_format_reads_the_same_rows(tmp_path, sample_records):
    expected, _, _ = clean_records(sample_records, 5)
    (tmp_path / "a.json").write_text(json.dumps(sample_records, ensure_ascii=False), encoding="utf-8")
    # The original PubMedQA release: a dict keyed by pubid.
    keyed = {r["pubid"]: {k: v for k, v in r.items() if k != "pubid"} for r in sample_records}
    (tmp_path / "b.json").write_text(json.dumps(keyed, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_records), encoding="utf-8"
    )
    frame = pd.DataFrame(sample_records)
    frame.to_parquet(tmp_path / "d.parquet")
    csv_frame = frame.assign(CONTEXTS=frame["CONTEXTS"].map(lambda c: json.dumps(c, ensure_ascii=False)))
    csv_frame.to_csv(tmp_path / "e.csv", index=False)
    for name in ("a.json", "b.json", "c.jsonl", "d.parquet", "e.csv"):
        rows, _, _ = clean_records(read_records(str(tmp_path / name), "test", None), 5)
        assert rows == expected, name


def test_cleaning_counts_every_dropped_row_by_reason(sample_records):
    rows, dropped, _ = clean_records(sample_records, 5)
    assert len(rows) == len(sample_records) - 3
    assert dropped["duplicate_question"] == 1
    assert dropped["missing_answer"] == 1
    assert dropped["short_question"] == 1
    assert len({r["question"] for r in rows}) == len(rows)


def test_cleaning_strips_and_normalises_to_nfc():
    decomposed = unicodedata.normalize("NFD", "  고혈압 환자에서 운동은 혈압을 낮추는가?  ")
    rows, _, _ = clean_records(
        [{"QUESTION": decomposed, "CONTEXTS": "한 문단.", "LONG_ANSWER": "그렇다, 유의하게 낮춘다."}], 5
    )
    assert rows[0]["question"] == "고혈압 환자에서 운동은 혈압을 낮추는가?"
    assert unicodedata.is_normalized("NFC", rows[0]["question"])
    assert rows[0]["contexts"] == ["한 문단."]  # one string becomes a one-paragraph list


def test_rows_without_an_id_get_a_stable_content_id():
    record = {"QUESTION": "당뇨병은 상처 치유를 늦추는가?", "CONTEXTS": [], "LONG_ANSWER": "그렇다, 늦춘다."}
    first, _, _ = clean_records([record], 5)
    second, _, _ = clean_records([dict(record)], 5)
    assert first[0]["id"] == second[0]["id"] and first[0]["id"].startswith("h")


def test_bad_inputs_fail_with_one_clear_message(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_records(str(tmp_path / "missing.json"), "test", None)
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    with pytest.raises(UserError, match="cannot be read"):
        read_records(str(tmp_path / "broken.json"), "test", None)
    with pytest.raises(UserError, match="no column LONG_ANSWER"):
        clean_records([{"QUESTION": "질문입니다?", "CONTEXTS": []}], 5)
    with pytest.raises(UserError, match="no rows left after cleaning"):
        clean_records([{"QUESTION": "짧", "CONTEXTS": [], "LONG_ANSWER": "답"}], 5)


def test_content_hash_depends_on_content_only(sample_records):
    assert content_hash(sample_records) == content_hash(json.loads(json.dumps(sample_records)))
    changed = [dict(r) for r in sample_records]
    changed[0]["LONG_ANSWER"] += "."
    assert content_hash(changed) != content_hash(sample_records)


def _rows(n, classes=("yes", "no", "maybe")):
    return [{"id": f"{i:04d}", "final_decision": classes[i % len(classes)]} for i in range(n)]


def test_split_is_seeded_and_leaks_nothing():
    rows = _rows(100)
    first, again = split_rows(rows, 0.1, 0.1, 42), split_rows(list(reversed(rows)), 0.1, 0.1, 42)
    assert first == again  # input order does not matter, only the seed
    assert split_rows(rows, 0.1, 0.1, 7) != first
    ids = [r["id"] for split in first.values() for r in split]
    assert len(ids) == len(set(ids)) == 100
    assert [len(first[s]) for s in ("train", "validation", "test")] == [80, 10, 10]


def test_split_is_stratified_by_final_decision():
    rows = _rows(60, ("yes", "yes", "yes", "no", "no", "maybe"))  # 30 yes, 20 no, 10 maybe
    splits = split_rows(rows, 0.2, 0.2, 42)
    for name in ("validation", "test"):
        assert Counter(r["final_decision"] for r in splits[name]) == {"yes": 6, "no": 4, "maybe": 2}


def test_split_sizes_accept_counts_and_refuse_empty_splits():
    assert split_counts(50, 5, 0.2) == (35, 5, 10)
    with pytest.raises(UserError, match="every split needs at least one row"):
        split_counts(5, 0.05, 0.05)
