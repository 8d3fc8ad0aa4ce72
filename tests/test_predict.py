"""Asking the model one question: the same prompt and answer as evaluation."""

import shutil

import pytest

from stages import paths, predict
from stages.outputs import read_jsonl


def test_predict_streams_the_answers_evaluation_recorded(pipeline_run, tmp_path, monkeypatch, capsys):
    # The smoke run's fine-tuned model answers "." to everything, so models/merged is swapped for
    # the untrained base model, whose answers depend on the whole prompt: predict must then give
    # the base answer that evaluate_base recorded for the same question and abstract.
    workspace = tmp_path / "ws"
    shutil.copytree(pipeline_run, workspace, symlinks=True)
    shutil.rmtree(workspace / paths.MERGED_DIR)
    shutil.copytree(workspace / "tiny-base", workspace / paths.MERGED_DIR)
    monkeypatch.chdir(workspace)
    rows = read_jsonl(paths.split_file("test"))
    longest = max(range(len(rows)), key=lambda i: len(rows[i]["prompt"]))
    index = (longest + 1) % len(rows)  # not the longest prompt: batching reorders it
    row, record = rows[index], read_jsonl(paths.PREDICTIONS)[index]
    assert record["id"] == row["id"]
    assert len({r["base_answer"] for r in read_jsonl(paths.PREDICTIONS)}) > 1  # a wrong prompt would show

    argv = [row["question"], *sum((["--context", c] for c in row["contexts"]), [])]
    capsys.readouterr()
    predict.main(argv)
    assert capsys.readouterr().out.strip() == record["base_answer"]

    predict.main([*argv, "--adapter"])  # the adapter on the base: the fine-tuned greedy answer
    assert capsys.readouterr().out.strip() == record["answer"]


def test_predict_without_a_model_says_what_to_run(workspace, capsys):
    with pytest.raises(SystemExit):
        predict.main(["질문?"])
    assert "run `dvc repro merge` first, or pass --adapter" in capsys.readouterr().err


class _Decoder:
    """A tokenizer stand-in whose text for more tokens rewrites what fewer tokens gave."""

    texts = {(1,): " 안녕 '", (1, 2): " 안녕'하세요 "}

    def decode(self, tokens, skip_special_tokens=True):
        return self.texts[tuple(tokens)]


def test_a_streamed_answer_that_decoding_rewrites_is_printed_whole(capsys):
    printer = predict._Printer(_Decoder())
    printer(0, [1])
    printer(0, [1, 2])  # no longer extends what was printed: nothing more yet
    printer.finish([1, 2])
    assert capsys.readouterr().out == "안녕 '\n안녕'하세요\n"  # stripped, as evaluation records answers


class _Silent:
    """A tokenizer stand-in whose every token decodes to no text (an end of turn, white space)."""

    def decode(self, tokens, skip_special_tokens=True):
        return " " * len(tokens)


def test_an_empty_answer_is_one_line_on_stderr(capsys):
    printer = predict._Printer(_Silent())
    printer(0, [7])
    printer.finish([7, 8])
    out, err = capsys.readouterr()
    assert out == "\n"  # the answer itself: nothing
    assert err.splitlines() == ["the model's answer is empty: 2 new tokens, none of them text (it ended its turn "
                                "at once, or wrote only white space or special tokens)"]
    printer = predict._Printer(_Decoder())
    printer.finish([1])
    assert capsys.readouterr().err == ""  # an answer with text says nothing more
