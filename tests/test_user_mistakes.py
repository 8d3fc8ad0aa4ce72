"""Every user mistake found by trying the pipeline gets one clear line and exit 2 (or the documented,
correct behaviour), never a traceback. One table, run through the stages as a user runs them."""

import json

import pandas as pd
import pytest

from conftest import write_params
from stages import predict, prepare, validate
from stages.outputs import read_jsonl
from stages.records import clean_records, read_records

SAMPLE = "data/sample/pubmedqa_ko_sample.json"


def _write(path: str, content: str | bytes):
    def setup(workspace):
        target = workspace / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return setup


def _jsonl_with_a_bad_third_line(workspace):
    rows = json.loads((workspace / SAMPLE).read_text(encoding="utf-8"))[:4]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[2] = lines[2][:-5]  # cut off the end of the third record
    (workspace / "data/broken.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cp949_csv(workspace):
    rows = json.loads((workspace / SAMPLE).read_text(encoding="utf-8"))[:5]
    frame = pd.DataFrame(rows)[["QUESTION", "LONG_ANSWER"]]
    (workspace / "data/excel.csv").write_bytes(frame.to_csv(index=False).encode("cp949", errors="replace"))


MISTAKES = [
    # (id, set-up, params, stage, the one line the user reads)
    ("optim-misspelled", None, {"train.optim": "adamw8bit"}, validate,
     "error: params.yaml: train.optim = 'adamw8bit': unknown optimizer; did you mean 'adamw_8bit'?"),
    ("scheduler-misspelled", None, {"train.lr_scheduler_type": "cosine_restarts"}, validate,
     "error: params.yaml: train.lr_scheduler_type = 'cosine_restarts': unknown scheduler; did you mean "
     "'cosine_with_restarts'?"),
    ("val-size-true", None, {"data.val_size": True}, validate,
     "error: params.yaml: data.val_size = True: expected a number, not true/false"),
    ("json-of-ints", _write("data/ints.json", "[1, 2, 3]"), {"data.source": "data/ints.json"}, validate,
     "error: data.source = data/ints.json: expected a list of records"),
    ("json-dict-of-strings", _write("data/strings.json", '{"a": "b"}'), {"data.source": "data/strings.json"}, validate,
     "error: data.source = data/strings.json: expected a list of records"),
    ("jsonl-bad-line", _jsonl_with_a_bad_third_line, {"data.source": "data/broken.jsonl"}, validate,
     "error: data.source = data/broken.jsonl: line 3 is not valid JSON"),
    ("source-without-suffix", _write("data/mydata", "QUESTION\n"), {"data.source": "data/mydata"}, validate,
     "error: data.source = data/mydata: unsupported file type; use one of .json, .jsonl, .parquet, .csv"),
    ("source-missing-path", None, {"data.source": "./data/nothing-here"}, validate,
     "error: data.source = data/nothing-here: no such file or folder"),
    ("source-is-a-folder", None, {"data.source": "data/sample"}, validate,
     "error: data.source = data/sample: is a folder"),
    ("csv-in-cp949", _cp949_csv, {"data.source": "data/excel.csv"}, validate,
     "error: data.source = data/excel.csv: not UTF-8 text (Excel on Korean Windows saves cp949/EUC-KR); re-save it"),
    ("model-folder-missing", None, {"model.name": "models/base/llama"}, validate,
     "error: model.name = models/base/llama: no such folder"),
    ("merge-base-folder-missing", None, {"model.base_16bit": "models/base/llama-16bit"}, validate,
     "error: model.base_16bit = models/base/llama-16bit: no such folder"),
    ("local-model-with-one-slash-broken", _write("models/llama-ko/README.md", "empty"), {"model.name": "models/llama-ko"},
     prepare, "error: model.name = models/llama-ko: this local model could not be loaded"),
]


@pytest.mark.parametrize("setup, overrides, stage, expected", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_and_exit_2(workspace, capsys, setup, overrides, stage, expected):
    if setup:
        setup(workspace)
    write_params(workspace, overrides)
    with pytest.raises(SystemExit) as stopped:
        stage.main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith(expected), err[-2000:]
    assert "Traceback" not in err and "\n" not in said[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["   "], "error: the question is empty"),
        (["질문?", "--max-new-tokens", "-5"], "error: --max-new-tokens = -5: give a positive number of tokens"),
        (["질문?", "--max-new-tokens", "0"], "error: --max-new-tokens = 0: give a positive number of tokens"),
        (["질문?", "--context", "초록 " * 3000], "error: the question and context take"),
    ],
    ids=["empty-question", "negative-length", "zero-length", "beyond-the-context-length"],
)
def test_predict_checks_what_the_user_typed(pipeline_run, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(pipeline_run)
    with pytest.raises(SystemExit) as stopped:
        predict.main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and [line for line in err.splitlines() if line.startswith("error:")][0].startswith(expected)
    assert "Traceback" not in err


def test_a_pandas_csv_keeps_its_list_columns_as_lists(tmp_path, sample_records):
    # pandas writes a list cell as Python's repr: ['문단 하나', '문단 둘']
    pd.DataFrame(sample_records[:3]).to_csv(tmp_path / "rows.csv", index=False)
    from_csv = read_records(str(tmp_path / "rows.csv"), "test", None)
    assert [r["CONTEXTS"] for r in from_csv] == [r["CONTEXTS"] for r in sample_records[:3]]
    assert all(isinstance(r["CONTEXTS"], list) and len(r["CONTEXTS"]) >= 1 for r in from_csv)


def test_final_decision_outside_yes_no_maybe_is_dropped_from_the_row_and_counted(workspace, sample_records):
    rows = [dict(r) for r in sample_records]
    for row, junk in zip(rows, (1, True, {"a": 1}, "unsure")):
        row["final_decision"] = junk
    rows[4]["final_decision"], rows[5]["final_decision"] = " YES ", "Maybe"
    kept, _, invalid = clean_records(rows, 5)
    assert invalid == 4
    assert [r.get("final_decision") for r in kept[:6]] == [None, None, None, None, "yes", "maybe"]

    (workspace / "data/junk.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    write_params(workspace, {"data.source": "data/junk.json"})
    prepare.main()
    assert json.loads((workspace / "metrics/info/prepare.json").read_text())["invalid_final_decision"] == 4
    labels = {r.get("final_decision") for split in ("train", "validation", "test")
              for r in read_jsonl(workspace / f"data/prepared/{split}.jsonl")}
    assert labels <= {"yes", "no", "maybe", None}
