"""Asking the model one question: the same prompt and answer as evaluation."""

import pytest

from stages import predict
from stages.evaluation import generate_answers
from stages.modeling import load_for_inference, load_tokenizer
from stages.outputs import read_jsonl
from stages.params import load_params


def test_predict_streams_the_answer_evaluation_gives(pipeline_run, monkeypatch, capsys):
    monkeypatch.chdir(pipeline_run)
    row = read_jsonl(pipeline_run / "data/prepared/test.jsonl")[0]
    params = load_params()
    model = load_for_inference("models/merged", "models/merged")
    tokenizer = load_tokenizer("models/merged")
    [expected], _ = generate_answers(model, tokenizer, [row["prompt"]], params.eval, params.seed)

    argv = [row["question"], *sum((["--context", c] for c in row["contexts"]), [])]
    capsys.readouterr()
    predict.main(argv)
    assert capsys.readouterr().out.strip() == expected

    predict.main([*argv, "--adapter"])  # adapter on the base: the same greedy answer
    assert capsys.readouterr().out.strip() == expected


def test_predict_without_a_model_says_what_to_run(workspace, capsys):
    with pytest.raises(SystemExit):
        predict.main(["질문?"])
    assert "run `dvc repro merge` first, or pass --adapter" in capsys.readouterr().err
