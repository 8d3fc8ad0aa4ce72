"""Every user mistake found by trying the pipeline gets one clear line and exit 2 (or the documented,
correct behaviour), never a traceback. One table, run through the stages as a user runs them."""

import json
import shutil
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import output_hashes, write_params
from stages import predict, prepare, validate
from stages.outputs import read_jsonl
from stages.records import clean_records, read_records

SAMPLE = "data/sample/pubmedqa_ko_sample.json"
ROOT = Path(__file__).resolve().parents[1]
LORA_R_LINE = (ROOT / "params.yaml").read_text(encoding="utf-8").splitlines().index(
    "  r: 16                    # adapter rank") + 1  # the smoke workspace's params.yaml keeps the layout
SAMPLE_DROPS = "(dropped: missing_answer 1, short_question 1, duplicate_question 1)"  # 52 rows, 49 usable


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


def _sample_rows(name: str, count: int, copies: int = 1):
    def setup(workspace):
        rows = json.loads((workspace / SAMPLE).read_text(encoding="utf-8"))[:count] * copies
        (workspace / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return setup


def _lora_r_twice(workspace):
    params = workspace / "params.yaml"
    lines = params.read_text(encoding="utf-8").splitlines(keepends=True)
    lines.insert(LORA_R_LINE + 1, "  r: 8\n")  # two lines further down, after alpha
    params.write_text("".join(lines), encoding="utf-8")


def _symlink_loop(workspace):
    os.symlink("loop.json", workspace / "data/loop.json")


def _accelerate_config(content):
    return _write("accelerate.yaml", content if isinstance(content, bytes) else yaml.safe_dump(content))


def _cp949_csv(workspace):
    rows = json.loads((workspace / SAMPLE).read_text(encoding="utf-8"))[:5]
    frame = pd.DataFrame(rows)[["QUESTION", "LONG_ANSWER"]]
    (workspace / "data/excel.csv").write_bytes(frame.to_csv(index=False).encode("cp949", errors="replace"))


def _file_in_place_of(folder: str):
    """A file where an output folder belongs: nothing can be written under it (unlike a chmod, even as root)."""
    def setup(workspace):
        shutil.rmtree(workspace / folder, ignore_errors=True)
        (workspace / folder).write_text("a file where a folder belongs", encoding="utf-8")
    return setup


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
    # What validate refuses before DVC deletes any output (issue 23): the machine, the split, the models,
    # the accelerate config, the params file itself, and values only a slip makes that large.
    ("4bit-without-cuda", None, {"model.load_in_4bit": True}, validate,
     "error: model.load_in_4bit = true needs a CUDA GPU (bitsandbytes NF4); this machine has none. On a CPU set "
     "-S model.load_in_4bit=false (full precision"),
    ("unsloth-without-cuda", None, {"model.backend": "unsloth"}, validate,
     "error: model.backend = unsloth needs a CUDA GPU; on this machine use -S model.backend=transformers"),
    ("test-size-beyond-the-data", None, {"data.test_size": 1000}, validate,
     f"error: 49 usable rows after cleaning and de-duplication {SAMPLE_DROPS}; data.val_size = 0.1 and "
     "data.test_size = 1000 take 5 validation and 1,000 test rows and leave the train split empty: every split "
     "needs at least one row"),
    ("one-row-source", _sample_rows("data/one.json", 1), {"data.source": "data/one.json"}, validate,
     "error: 1 usable row after cleaning and de-duplication; data.val_size = 0.1 and data.test_size = 0.1 take 0 "
     "validation and 0 test rows and leave the validation and test splits empty"),
    ("three-row-source", _sample_rows("data/three.json", 3), {"data.source": "data/three.json"}, validate,
     "error: 3 usable rows after cleaning and de-duplication; data.val_size = 0.1 and data.test_size = 0.1 take 0 "
     "validation and 0 test rows and leave the validation and test splits empty"),
    ("ten-thousand-duplicates", _sample_rows("data/same.json", 1, 10_000), {"data.source": "data/same.json"}, validate,
     "error: 1 usable row after cleaning and de-duplication (dropped: duplicate_id 9,999); data.val_size = 0.1"),
    ("model-folder-not-a-model", _write("models/llama-ko/README.md", "empty"), {"model.name": "models/llama-ko"},
     validate, "error: model.name = models/llama-ko: not a model folder (no config.json in it); point it at the "
     "folder that holds the model's config.json and weights"),
    ("merge-base-folder-not-a-model", _write("models/llama-16/README.md", "empty"),
     {"model.base_16bit": "models/llama-16"}, validate,
     "error: model.base_16bit = models/llama-16: not a model folder (no config.json in it)"),
    ("merge-base-config-unreadable", _write("models/llama-16/config.json", '{"model_type": "llama-ko"}'),
     {"model.base_16bit": "models/llama-16"}, validate,
     "error: model.base_16bit = models/llama-16: this local model could not be loaded (ValueError: "),
    ("accelerate-config-missing", None, {"train.num_processes": 2, "train.accelerate_config": "missing.yaml"}, validate,
     "error: train.accelerate_config = missing.yaml: no such file"),
    ("accelerate-config-random-bytes", _accelerate_config(bytes(range(128, 256)) * 4),
     {"train.num_processes": 2, "train.accelerate_config": "accelerate.yaml"}, validate,
     "error: train.accelerate_config = accelerate.yaml: not a text file (not UTF-8)"),
    ("accelerate-config-a-list", _accelerate_config([1, 2]),
     {"train.num_processes": 2, "train.accelerate_config": "accelerate.yaml"}, validate,
     "error: train.accelerate_config = accelerate.yaml: not an accelerate config file"),
    ("accelerate-config-without-rank", _accelerate_config({"num_machines": 2, "main_process_ip": "10.0.0.1"}),
     {"train.num_processes": 2, "train.accelerate_config": "accelerate.yaml"}, validate,
     "error: train.accelerate_config = accelerate.yaml: machine_rank = None: give this machine's rank"),
    ("accelerate-config-without-address", _accelerate_config({"num_machines": 2, "machine_rank": 1}),
     {"train.num_processes": 2, "train.accelerate_config": "accelerate.yaml"}, validate,
     "error: train.accelerate_config = accelerate.yaml: no main_process_ip"),
    ("duplicate-key", _lora_r_twice, {}, validate,
     f"error: params.yaml: lora.r is set twice (lines {LORA_R_LINE} and {LORA_R_LINE + 2}); keep one"),
    ("max-new-tokens-huge", None, {"eval.max_new_tokens": 1_000_000_000}, validate,
     "error: params.yaml: eval.max_new_tokens = 1000000000: Input should be less than or equal to 131072"),
    ("max-new-tokens-beyond-the-model", None, {"eval.max_new_tokens": 4097}, validate,
     "error: eval.max_new_tokens = 4097: more than model.name = tiny-base allows (its config's "
     "max_position_embeddings is 4096); set -S eval.max_new_tokens=4096 or lower"),
    ("max-seq-length-beyond-the-model", None, {"model.max_seq_length": 8192}, validate,
     "error: model.max_seq_length = 8192: more than model.name = tiny-base allows (its config's "
     "max_position_embeddings is 4096)"),
    ("lora-r-huge", None, {"lora.r": 1_000_000_000_000}, validate,
     "error: lora.r = 1000000000000: more than model.name = tiny-base allows (its config's hidden_size is 64); "
     "set -S lora.r=64 or lower"),
    ("train-batch-beyond-the-data", None, {"train.per_device_train_batch_size": 1_000_000_000}, validate,
     "error: train.per_device_train_batch_size = 1000000000: more than the train split's 39 rows"),
    ("eval-batch-beyond-the-data", None, {"train.per_device_eval_batch_size": 1_000_000_000}, validate,
     "error: train.per_device_eval_batch_size = 1000000000: more than all the usable 49 rows"),
    ("answer-batch-beyond-the-data", None, {"eval.batch_size": 1_000_000_000}, validate,
     "error: eval.batch_size = 1000000000: more than all the usable 49 rows"),
    ("learning-rate-nan", None, {"train.learning_rate": float("nan")}, validate,
     "error: params.yaml: train.learning_rate = nan: not a finite number"),
    ("val-size-infinite", None, {"data.val_size": float("inf")}, validate,
     "error: params.yaml: data.val_size = inf: not a finite number"),
    ("source-is-a-url", None, {"data.source": "https://example.com/data.json"}, validate,
     "error: data.source = https://example.com/data.json: URLs are not read; download the file first"),
    ("source-is-a-symlink-loop", _symlink_loop, {"data.source": "data/loop.json"}, validate,
     "error: data.source = data/loop.json: a symlink loop"),
    ("cost-folder-unwritable", _file_in_place_of("metrics/cost"), {}, validate,
     "error: cannot write metrics/cost/train.json: File exists; check that folder's permissions and free disk space"),
]


@pytest.mark.parametrize("setup, overrides, stage, expected", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_line_and_exit_2(committed_workspace, capsys, monkeypatch, setup, overrides, stage,
                                          expected):
    """In a workspace holding a committed result, which every row must leave byte for byte."""
    workspace = committed_workspace
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # every row on a machine without CUDA
    if setup:
        setup(workspace)
    if overrides:  # (none: the set-up wrote params.yaml itself)
        write_params(workspace, overrides)
    before = output_hashes(workspace)
    with pytest.raises(SystemExit) as stopped:
        stage.main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].startswith(expected), err[-2000:]
    assert "Traceback" not in err and "\n" not in said[0]
    assert output_hashes(workspace) == before


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
