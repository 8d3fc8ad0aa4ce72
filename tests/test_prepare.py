"""The prepare stage on the shipped sample with the tiny tokenizer."""

import json
from pathlib import Path

import pytest

from conftest import write_params
from stages import paths, prepare
from stages.params import load_params
from stages.prompt import build_messages, encode
from stages.records import clean_records


def _outputs() -> dict[str, bytes]:
    files = [paths.split_file(s) for s in paths.SPLITS] + [paths.PREPARE_INFO]
    return {str(f): Path(f).read_bytes() for f in files}


def test_two_runs_write_identical_bytes(workspace):
    prepare.main()
    first = _outputs()
    prepare.main()
    assert _outputs() == first


def test_splits_metrics_and_rendered_chats(workspace, tiny_tokenizer):
    prepare.main()
    metrics = json.loads(paths.PREPARE_INFO.read_text(encoding="utf-8"))
    splits = {s: [json.loads(line) for line in paths.split_file(s).open(encoding="utf-8")] for s in paths.SPLITS}
    assert metrics["rows"] == {"read": 52, "kept": 49, "train": 39, "validation": 5, "test": 5}
    assert metrics["dropped"] == {"missing_question": 0, "missing_answer": 1, "short_question": 1, "short_answer": 0,
                                  "duplicate_id": 0, "duplicate_question": 1, "too_long": 0}
    assert len(metrics["source_sha256"]) == 64
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(ids) == len(set(ids))
    for split, rows in splits.items():
        assert metrics["tokens_max"][split] == max(r["n_tokens"] for r in rows) <= 512
        for row in rows:
            assert row["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
            assert row["completion"] == row["answer"] + "<|eot_id|>"
            assert row["question"] in row["prompt"] and "당신은 의학 연구" in row["prompt"]
            n_tokens = len(encode(tiny_tokenizer, row["prompt"])) + len(encode(tiny_tokenizer, row["completion"]))
            assert n_tokens == row["n_tokens"]


def test_truncation_shortens_the_abstract_never_the_answer(workspace, sample_records):
    write_params(workspace, {"model.max_seq_length": 300})
    prepare.main()
    metrics = json.loads(paths.PREPARE_INFO.read_text(encoding="utf-8"))
    rows = [json.loads(line) for s in paths.SPLITS for line in paths.split_file(s).open(encoding="utf-8")]
    truncated = [r for r in rows if r["truncated"]]
    assert len(truncated) == sum(metrics["truncated"].values()) > 10
    originals = {r["pubid"]: r for r in sample_records}
    for row in truncated:
        source = originals[row["id"]]
        assert row["answer"] == source["LONG_ANSWER"].strip()
        assert row["n_tokens"] <= 300
        full_abstract = "\n\n".join(source["CONTEXTS"])
        kept_abstract = "\n\n".join(row["contexts"])
        assert len(kept_abstract) < len(full_abstract) and full_abstract.startswith(kept_abstract)


def test_rows_that_cannot_fit_are_dropped_and_counted(workspace, sample_records, tiny_tokenizer):
    limit = 245  # between the shortest (207 tokens) and longest (265) question + answer chats
    write_params(workspace, {"model.max_seq_length": limit, "data.include_contexts": False})
    prepare.main()
    params = load_params()
    cleaned, _, _ = clean_records(sample_records, params.data.min_chars)
    chat_tokens = {row["id"]: len(tiny_tokenizer.apply_chat_template(
        build_messages(params.prompt.system, row["question"], [], False, row["answer"]), tokenize=True,
        return_dict=False)) for row in cleaned}
    too_long = {row_id for row_id, n in chat_tokens.items() if n > limit}
    assert 0 < len(too_long) < len(cleaned)
    info = json.loads(paths.PREPARE_INFO.read_text(encoding="utf-8"))
    assert info["dropped"]["too_long"] == len(too_long)
    assert info["rows"]["kept"] == len(cleaned) - len(too_long) == sum(info["rows"][s] for s in paths.SPLITS)
    kept = {json.loads(line)["id"] for s in paths.SPLITS for line in paths.split_file(s).open(encoding="utf-8")}
    assert kept == set(chat_tokens) - too_long


def test_when_no_row_fits_prepare_stops_and_writes_nothing(workspace, capsys):
    write_params(workspace, {"model.max_seq_length": 64, "data.include_contexts": False})
    with pytest.raises(SystemExit):  # nothing fits in 64 tokens with the system prompt
        prepare.main()
    assert "error: no row fits model.max_seq_length = 64 tokens" in capsys.readouterr().err
    assert not paths.PREPARED_DIR.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.source": "data/nope.json"}, "data.source = data/nope.json: no such file"),
        ({"data.val_size": 30, "data.test_size": 19}, "every split needs at least one row"),
        ({"model.name": "./models/missing-model"}, "model.name = ./models/missing-model: no such file or folder"),
    ],
)
def test_bad_input_leaves_previous_outputs_intact(workspace, capsys, overrides, message):
    prepare.main()
    before = _outputs()
    write_params(workspace, overrides)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert _outputs() == before
    assert not list(workspace.glob("data/.prepared.tmp-*"))


def test_missing_column_is_reported(workspace, capsys, sample_records):
    rows = [{k: v for k, v in r.items() if k != "LONG_ANSWER"} for r in sample_records]
    Path("data/no_answer.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    write_params(workspace, {"data.source": "data/no_answer.json"})
    with pytest.raises(SystemExit):
        prepare.main()
    assert "data.source has no column LONG_ANSWER" in capsys.readouterr().err
