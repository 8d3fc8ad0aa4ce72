"""The promises to users on hospital servers: no network, no leaked token, errors that say what to do."""

import json

import pytest
import torch

from conftest import TOKEN_SENTINEL
from stages import train
from stages.modeling import describe_load_error
from stages.params import TrainParams


def test_no_stage_opens_a_network_connection(pipeline_run):
    # The whole pipeline ran with socket.connect refused (see conftest.pipeline_run).
    assert json.loads((pipeline_run / ".network_attempts.json").read_text()) == []
    assert (pipeline_run / "metrics/eval.json").exists()


def test_the_hub_token_is_never_written(pipeline_run):
    leaked = [str(path) for path in pipeline_run.rglob("*") if path.is_file()
              and TOKEN_SENTINEL.encode() in path.read_bytes()]
    assert leaked == []


class GatedRepoError(OSError):
    pass


@pytest.mark.parametrize(
    "error, expected",
    [
        (GatedRepoError("401 Client Error. Access to model meta-llama/Llama-3.1-8B-Instruct is restricted"),
         "is gated or private: accept its licence on the Hugging Face Hub"),
        (OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                 "in the cached files."), "the Hugging Face Hub cannot be reached"),
        (OSError("x is not a local folder and is not a valid model identifier listed on the Hub"),
         "no such model on the Hub or on disk"),
    ],
)
def test_load_errors_become_one_line_with_what_to_do(error, expected):
    message = describe_load_error("model.name", "meta-llama/Llama-3.1-8B-Instruct", error)
    assert expected in message and "\n" not in message
    assert message.startswith("model.name = meta-llama/Llama-3.1-8B-Instruct")


def test_hub_unreachable_advice_names_the_offline_recipe():
    message = describe_load_error("model.base_16bit", "unsloth/Meta-Llama-3.1-8B-Instruct",
                                  OSError("offline mode is enabled"))
    assert "hf download unsloth/Meta-Llama-3.1-8B-Instruct --local-dir DIR" in message
    assert "set model.base_16bit to DIR" in message


def test_out_of_gpu_memory_suggests_params_that_keep_the_effective_batch(workspace, monkeypatch, capsys):
    from trl import SFTTrainer

    from stages import prepare

    prepare.main()

    def out_of_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SFTTrainer, "training_step", out_of_memory)
    with pytest.raises(SystemExit):
        train.main()
    error = capsys.readouterr().err
    assert "out of GPU memory at train.per_device_train_batch_size = 2" in error
    assert "-S train.per_device_train_batch_size=1 -S train.gradient_accumulation_steps=4" in error
    assert "Traceback" not in error
    advice = train.out_of_memory_advice(TrainParams(), 2048)
    assert "per_device_train_batch_size=6 -S train.gradient_accumulation_steps=2" in advice
