"""Reading, cleaning and splitting rows (pure functions, no model)."""

import hashlib
import json
import re
import unicodedata
from collections import Counter
from datetime import date

import pandas as pd
import pytest

from stages.errors import UserError
from stages.records import (
    DROP_REASONS, clean_records, content_hash, is_local_source, read_records, split_counts, split_rows,
)


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


def test_csv_and_parquet_keep_ids_as_written_and_missing_values_missing(tmp_path):
    frame = pd.DataFrame([
        {"pubid": "00123", "QUESTION": "고혈압은 유전되는가?", "CONTEXTS": ["문단 하나.", "문단 둘."],
         "LONG_ANSWER": "일부 그렇다.", "year": 2019},
        {"pubid": "00124", "QUESTION": "비만은 유전되는가?", "CONTEXTS": [], "LONG_ANSWER": None, "year": 2020},
    ])  # a number column too: parquet keeps it a number
    frame.assign(CONTEXTS=frame["CONTEXTS"].map(json.dumps)).to_csv(tmp_path / "a.csv", index=False)
    frame.to_parquet(tmp_path / "a.parquet")
    for name in ("a.csv", "a.parquet"):
        rows, dropped, _ = clean_records(read_records(str(tmp_path / name), "test", None), 5)
        assert rows == [{"id": "00123", "question": "고혈압은 유전되는가?", "contexts": ["문단 하나.", "문단 둘."],
                         "answer": "일부 그렇다."}], name
        assert dropped["missing_answer"] == 1


@pytest.mark.parametrize(
    "source, local",
    [
        ("ChuGyouk/PubMedQA-test-Ko", False),
        ("data/new.json", True),  # by its suffix, even before it exists
        ("./my-data", True), ("/srv/data/pubmedqa", True), ("~/pubmedqa", True),
        ("data/sample", True),  # an existing path without a prefix or a suffix
    ],
)
def test_local_paths_and_hub_ids_are_told_apart(source, local):
    assert is_local_source(source) is local


def test_hub_sources_are_read_with_the_split_and_revision_asked_for(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, **kwargs):  # the Hub is out of reach in tests: record the request
        calls.append((path, kwargs))
        return datasets.Dataset.from_list([{"QUESTION": "질문입니다?", "CONTEXTS": [], "LONG_ANSWER": "답변입니다."}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = read_records("owner/medqa", "validation", "0123abc")
    assert calls == [("owner/medqa", {"split": "validation", "revision": "0123abc"})]
    assert rows == [{"QUESTION": "질문입니다?", "CONTEXTS": [], "LONG_ANSWER": "답변입니다."}]

    def unreachable(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (ConnectionError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UserError, match=r"^data.source = owner/medqa: the Hugging Face Hub cannot be reached"):
        read_records("owner/medqa", "test", None)


def test_cleaning_counts_every_dropped_row_by_reason(sample_records):
    rows, dropped, _ = clean_records(sample_records, 5)
    assert len(rows) == len(sample_records) - 3
    assert dropped["duplicate_question"] == 1
    assert dropped["missing_answer"] == 1
    assert dropped["short_question"] == 1
    assert len({r["question"] for r in rows}) == len(rows)


def _qa(question, answer, **extra):
    return {"QUESTION": question, "CONTEXTS": ["문단."], "LONG_ANSWER": answer, **extra}


def test_every_drop_reason_is_counted_on_its_own():
    # A different number of rows for each reason, so a count credited to the wrong reason shows.
    records = [_qa(f"당뇨병 환자 {i}번은 회복이 느린가?", "그렇다, 느리다.", pubid=str(i)) for i in range(3)]
    records += [_qa(None, "그렇다, 느리다.", pubid="q0"), _qa("   ", "그렇다.", pubid="q1")]  # missing_question: 2
    records += [_qa(f"답이 없는 질문 {i}?", bad, pubid=f"a{i}") for i, bad in enumerate([None, "", 7])]  # 3
    records += [_qa("짧다?", "충분히 긴 답변.", pubid=f"s{i}") for i in range(4)]  # short_question: 4 (3 chars)
    records += [_qa(f"충분히 긴 질문 {i}?", "짧다", pubid=f"t{i}") for i in range(5)]  # short_answer: 5
    # duplicate_id: 1, the same pubid as row 0 with another question; duplicate_question: 6, new ids.
    records += [_qa("전혀 다른 질문인가?", "그렇다, 다르다.", pubid="0")]
    records += [_qa("당뇨병 환자 1번은 회복이 느린가?", "아니다, 빠르다.", pubid=f"d{i}") for i in range(6)]
    rows, dropped, _ = clean_records(records, min_chars=5)
    assert dropped == {"missing_question": 2, "missing_answer": 3, "short_question": 4, "short_answer": 5,
                       "duplicate_id": 1, "duplicate_question": 6, "too_long": 0}
    assert set(dropped) == set(DROP_REASONS)
    assert [r["id"] for r in rows] == ["0", "1", "2"]  # the first of each duplicate is the one kept
    assert rows[0] == {"id": "0", "question": "당뇨병 환자 0번은 회복이 느린가?", "contexts": ["문단."],
                       "answer": "그렇다, 느리다."}


def test_min_chars_is_inclusive():
    rows, dropped, _ = clean_records([_qa("다섯글자?", "다섯글자.", id="x"), _qa("넷글자", "다섯글자.", id="y")], 5)
    assert [r["id"] for r in rows] == ["x"] and dropped["short_question"] == 1


def test_the_first_id_column_present_is_used():
    rows, _, _ = clean_records([_qa("고혈압은 유전되는가?", "일부 그렇다.", pubid="123", id="x", ID="y"),
                             _qa("비만은 유전되는가?", "일부 그렇다.", id="", ID="z"),
                             _qa("흡연은 유전되는가?", "아니다, 아니다.", id=0)], 5)
    assert [r["id"] for r in rows] == ["123", "z", "0"]


def test_final_decision_is_kept_normalised():
    rows, _, _ = clean_records([_qa("고혈압은 유전되는가?", "일부 그렇다.", final_decision=" YES "),
                             _qa("비만은 유전되는가?", "일부 그렇다.")], 5)
    assert rows[0]["final_decision"] == "yes" and "final_decision" not in rows[1]


def test_cleaning_strips_and_normalises_to_nfc():
    decomposed = unicodedata.normalize("NFD", "  고혈압 환자에서 운동은 혈압을 낮추는가?  ")
    rows, _, _ = clean_records(
        [{"QUESTION": decomposed, "CONTEXTS": "한 문단.", "LONG_ANSWER": "그렇다, 유의하게 낮춘다."}], 5
    )
    assert rows[0]["question"] == "고혈압 환자에서 운동은 혈압을 낮추는가?"
    assert unicodedata.is_normalized("NFC", rows[0]["question"])
    assert rows[0]["contexts"] == ["한 문단."]  # one string becomes a one-paragraph list
    paragraphs, _, _ = clean_records([_qa("고혈압 환자는 운동해야 하는가?", "그렇다, 해야 한다.") | {
        "CONTEXTS": [" 첫 문단. ", "", "둘째 문단."]}], 5)
    assert paragraphs[0]["contexts"] == ["첫 문단.", "둘째 문단."]  # stripped, empty ones dropped


def test_rows_without_an_id_get_a_stable_content_id():
    record = {"QUESTION": "당뇨병은 상처 치유를 늦추는가?", "CONTEXTS": [], "LONG_ANSWER": "그렇다, 늦춘다."}
    first, _, _ = clean_records([record], 5)
    second, _, _ = clean_records([dict(record)], 5)
    assert first[0]["id"] == second[0]["id"] and re.fullmatch(r"h[0-9a-f]{12}", first[0]["id"])
    # The id comes from the content: another question or another answer gives another id, and
    # an exact repeat the same id, so it is dropped as a duplicate.
    other_answer, _, _ = clean_records([{**record, "LONG_ANSWER": "아니다, 늦추지 않는다."}], 5)
    assert other_answer[0]["id"] != first[0]["id"]
    rows, dropped, _ = clean_records([record, {**record, "QUESTION": "비만은 상처 치유를 늦추는가?"}, dict(record)], 5)
    assert rows[0]["id"] == first[0]["id"] != rows[1]["id"]
    assert len(rows) == 2 and dropped["duplicate_id"] == 1 and dropped["duplicate_question"] == 0


def test_bad_inputs_fail_with_one_clear_message(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_records(str(tmp_path / "missing.json"), "test", None)
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    with pytest.raises(UserError, match="cannot be read"):
        read_records(str(tmp_path / "broken.json"), "test", None)
    with pytest.raises(UserError, match=r"^data.source = .*broken.json: cannot be read \(JSONDecodeError: "):
        read_records(str(tmp_path / "broken.json"), "test", None)
    (tmp_path / "number.json").write_text("42", encoding="utf-8")
    with pytest.raises(UserError, match=r"number.json: expected a list of records .* or a dict of records keyed by id, found int$"):
        read_records(str(tmp_path / "number.json"), "test", None)
    (tmp_path / "notes.txt").write_text("질문", encoding="utf-8")
    with pytest.raises(UserError, match=r"notes.txt: unsupported file type; use one of .json, .jsonl, .parquet, .csv$"):
        read_records(str(tmp_path / "notes.txt"), "test", None)
    with pytest.raises(UserError, match="^data.source holds no rows$"):
        clean_records([], 5)
    with pytest.raises(UserError, match="^data.source has no column CONTEXTS, LONG_ANSWER; "
                                        "expected QUESTION, CONTEXTS, LONG_ANSWER$"):
        clean_records([{"QUESTION": "질문입니다?"}], 5)
    with pytest.raises(UserError, match=r"^no rows left after cleaning \(dropped: \{'short_question': 1\}\); "
                                        "check data.min_chars and the columns$"):
        clean_records([{"QUESTION": "짧", "CONTEXTS": [], "LONG_ANSWER": "답"}], 5)


def _unreadable(tmp_path, name, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(UserError) as error:
        read_records(str(path), "test", None)
    return str(error.value).replace(str(path), name)


def test_a_source_of_the_wrong_shape_says_where(tmp_path):
    row = json.dumps({"QUESTION": "질문?", "CONTEXTS": [], "LONG_ANSWER": "답."}, ensure_ascii=False)
    assert _unreadable(tmp_path, "list.json", f"[{row}, 2]").endswith("found a list whose item 1 is int")
    assert _unreadable(tmp_path, "dict.json", f'{{"1": {row}, "2": "x"}}').endswith(
        "found a dict whose value for '2' is str")
    # JSON lines are numbered from 1, blank lines included; a line that is JSON but not an object is named
    lines = f"{row}\n\n{row}\n"
    assert _unreadable(tmp_path, "bad.jsonl", lines + '{"QUESTION": \n').startswith(
        "data.source = bad.jsonl: line 4 is not valid JSON (")
    assert _unreadable(tmp_path, "list.jsonl", lines + "[1, 2]\n") == \
        "data.source = list.jsonl: line 4 is list, not a record"
    (tmp_path / "ok.jsonl").write_text(lines + row + "\n", encoding="utf-8")
    assert len(read_records(str(tmp_path / "ok.jsonl"), "test", None)) == 3  # rows after a blank line count too


def test_a_folder_or_a_cp949_file_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError) as error:
        read_records(str(tmp_path / "data"), "test", None)
    assert str(error.value) == f"data.source = {tmp_path / 'data'}: is a folder; point it at a .json, .jsonl, " \
                               ".parquet, .csv file"
    excel = pd.DataFrame([{"QUESTION": "질문입니다?", "LONG_ANSWER": "답입니다."}]).to_csv(index=False)
    assert _unreadable(tmp_path, "excel.csv", excel.encode("cp949")) == (
        "data.source = excel.csv: not UTF-8 text (Excel on Korean Windows saves cp949/EUC-KR); re-save it as UTF-8 "
        "(Excel: 'CSV UTF-8', or: iconv -f cp949 -t utf-8 IN > OUT)")


def test_final_decisions_outside_the_labels_are_counted_but_empty_ones_are_not():
    labels = [1, True, {"a": 1}, "unsure", "", None, " No "]
    rows, _, invalid = clean_records([_qa(f"질문 번호 {i}?", "답변입니다.", final_decision=label)
                                      for i, label in enumerate(labels)], 5)
    assert invalid == 4
    assert [r.get("final_decision") for r in rows] == [None] * 6 + ["no"]


def test_content_hash_depends_on_content_only(sample_records):
    assert content_hash(sample_records) == content_hash(json.loads(json.dumps(sample_records)))
    assert content_hash([{"a": 1, "b": 2}]) == content_hash([{"b": 2, "a": 1}])  # key order is not content
    # The canonical form, so the hash in metrics/info/prepare.json can be recomputed anywhere: sorted keys,
    # UTF-8 text, anything else (dates from a parquet file, ...) as its str().
    canonical = '[{"QUESTION": "질문", "date": "2024-07-26", "n": 1}]'
    expected = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert content_hash([{"n": 1, "date": date(2024, 7, 26), "QUESTION": "질문"}]) == expected
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
    assert split_counts(50, 1, 1) == (48, 1, 1)  # 1 is one row, not the whole data set
    assert split_counts(3, 1, 1) == (1, 1, 1)
    for n_rows, val_size, test_size in ((5, 0.05, 0.5), (5, 0.5, 0.05), (10, 5, 5)):  # no validation, test, train
        with pytest.raises(UserError, match="every split needs at least one row"):
            split_counts(n_rows, val_size, test_size)


def test_an_empty_split_says_how_many_rows_were_usable_and_where_the_others_went():
    dropped = Counter({"missing_answer": 0, "duplicate_id": 9999})
    with pytest.raises(UserError) as error:
        split_counts(1, 0.1, 0.1, dropped)
    assert str(error.value) == (
        "1 usable row after cleaning and de-duplication (dropped: duplicate_id 9,999); data.val_size = 0.1 and "
        "data.test_size = 0.1 take 0 validation and 0 test rows and leave the validation and test splits empty: "
        "every split needs at least one row")
    with pytest.raises(UserError, match=r"^49 usable rows after cleaning and de-duplication; data.val_size = 0.1 "
                                        r"and data.test_size = 1000 take 5 validation and 1,000 test rows and "
                                        r"leave the train split empty: "):
        split_counts(49, 0.1, 1000)


def test_a_url_or_a_broken_link_is_named_for_what_it_is(tmp_path):
    with pytest.raises(UserError) as error:
        read_records("https://example.com/pubmedqa.json", "test", None)
    assert str(error.value) == (
        "data.source = https://example.com/pubmedqa.json: URLs are not read; download the file first (e.g. curl "
        "-L -o data/mine.json 'https://example.com/pubmedqa.json') and set data.source to its path")
    (tmp_path / "loop.json").symlink_to("loop.json")
    with pytest.raises(UserError, match=r"loop.json: a symlink loop \(a link that leads back to itself\)"):
        read_records(str(tmp_path / "loop.json"), "test", None)
    (tmp_path / "moved.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(UserError, match=rf"moved.json: a symbolic link to {tmp_path}/gone.json, which does not exist"):
        read_records(str(tmp_path / "moved.json"), "test", None)


@pytest.mark.parametrize("sizes", [(10, 20, 30), (5, 50), (1, 1, 10)])
def test_every_held_out_prefix_holds_each_class_in_proportion(sizes):
    # Whatever the test size, each class's count in it is within one row of its proportional share.
    classes = [name for name, size in zip(("yes", "no", "maybe"), sizes) for _ in range(size)]
    rows = [{"id": f"{i:04d}", "final_decision": c} for i, c in enumerate(classes)]
    total = Counter(classes)
    for n_test in range(1, len(rows) - 1):
        held_out = Counter(r["final_decision"] for r in split_rows(rows, 1, n_test, 42)["test"])
        for name, size in total.items():
            assert abs(held_out[name] - n_test * size / len(rows)) < 1, (n_test, name)


def test_the_seed_decides_the_split_within_a_class_and_between_classes():
    one_class = [{"id": f"{i:04d}"} for i in range(20)]
    assert len({tuple(r["id"] for r in split_rows(one_class, 2, 2, seed)["test"]) for seed in range(5)}) > 1
    one_each = [{"id": name, "final_decision": name} for name in ("yes", "no", "maybe")]  # all tied
    assert len({split_rows(one_each, 1, 1, seed)["test"][0]["id"] for seed in range(10)}) > 1
