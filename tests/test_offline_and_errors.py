"""The promises to users on hospital servers: no network, no leaked token, errors that say what to do."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import TOKEN_SENTINEL, write_params
from stages import train
from stages.modeling import describe_load_error
from stages.params import TrainParams

HUB_MODEL = "acme/tiny-llama"  # a hub id, served by FakeHub from the workspace's tiny model


def test_no_stage_opens_a_network_connection(pipeline_run):
    # The whole pipeline ran with socket.connect refused (see conftest.pipeline_run).
    assert json.loads((pipeline_run / ".network_attempts.json").read_text()) == []
    assert json.loads((pipeline_run / "metrics/info/evaluate.json").read_text())["test"]["n"] == 5  # and it ran to the end


class FakeHub:
    """The Hub's file endpoints for a few repos, answered in-process through httpx's MockTransport.

    Only the network is replaced: huggingface_hub (token, headers, errors), transformers and the
    stages run as they do against huggingface.co. Files are served from local folders; a gated repo
    answers 403 as the Hub does; anything else is a missing repo or file.
    """

    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()):
        self.repos, self.gated, self.requests = repos, gated, []

    def __call__(self, request):
        import httpx

        self.requests.append(request)
        path = request.url.path.strip("/").removeprefix("api/models/")
        repo = next((r for r in (*self.repos, *self.gated) if path.startswith(f"{r}/")), None)
        if repo is None:
            return httpx.Response(404, headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if repo in self.gated:
            return httpx.Response(403, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": (
                f"Access to model {repo} is restricted. You must have access to it and be authenticated.")})
        kind, _, rest = path.removeprefix(f"{repo}/").partition("/")  # resolve/<revision>/<file>, or an API call
        file = self.repos[repo] / rest.partition("/")[2]
        if kind != "resolve" or not file.is_file():  # file listings are not served: clients fall back
            return httpx.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
        body = file.read_bytes()
        headers = {"X-Repo-Commit": "0123456789abcdef0123456789abcdef01234567", "Content-Length": str(len(body)),
                   "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
        return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else body)


@pytest.fixture
def fake_hub(workspace, tmp_path, monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub import constants

    hub = FakeHub({HUB_MODEL: workspace / "tiny-base"}, gated=("meta-llama/Llama-3.1-8B-Instruct",))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests' default is offline
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN_SENTINEL)
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(hub), follow_redirects=True))
    yield hub
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


def _sent_the_token(hub: FakeHub, repo: str) -> bool:
    to_repo = [r for r in hub.requests if r.url.path.startswith(f"/{repo}/")]
    return bool(to_repo) and all(r.headers.get("authorization") == f"Bearer {TOKEN_SENTINEL}" for r in to_repo)


def test_the_hub_token_is_sent_to_the_hub_and_written_nowhere(workspace, fake_hub, capsys, caplog):
    from stages import evaluate_base, merge, prepare

    write_params(workspace, {"model.name": HUB_MODEL, "model.base_16bit": HUB_MODEL, "train.max_steps": 2,
                             "train.save_steps": 2, "train.eval_steps": 2, "eval.max_new_tokens": 4})
    with caplog.at_level("DEBUG"):
        for stage in (prepare, train, merge, evaluate_base):  # every stage that loads from the hub
            stage.main()
    assert _sent_the_token(fake_hub, HUB_MODEL)  # the token was read: this run could have leaked it
    assert json.loads(Path("metrics/info/evaluate_base.json").read_text(encoding="utf-8"))["test"]["n"] == 5
    leaked = [str(path) for path in workspace.rglob("*") if path.is_file()
              and TOKEN_SENTINEL.encode() in path.read_bytes()]
    assert leaked == []  # params, data, adapter, checkpoints (training_args.bin), merged model, metrics
    printed = capsys.readouterr()
    assert TOKEN_SENTINEL not in printed.out + printed.err + caplog.text


@pytest.mark.parametrize(
    "model, expected",
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "model.name = meta-llama/Llama-3.1-8B-Instruct is gated or private: "
                                             "accept its licence on the Hugging Face Hub"),
        ("acme/no-such-model", "model.name = acme/no-such-model: no such model on the Hub or on disk"),
    ],
)
def test_hub_refusals_become_one_line_without_the_token(workspace, fake_hub, capsys, model, expected):
    from stages import prepare

    write_params(workspace, {"model.name": model})
    with pytest.raises(SystemExit) as exit_info:
        prepare.main()
    assert exit_info.value.code == 2
    assert _sent_the_token(fake_hub, model)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err
    assert TOKEN_SENTINEL not in err


def _hub_error(status: int, error_code: str):
    """The exception huggingface_hub itself raises for a Hub response with this status and code."""
    import httpx
    from huggingface_hub.utils import hf_raise_for_status

    url = "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/resolve/main/config.json"
    try:
        hf_raise_for_status(httpx.Response(status, headers={"X-Error-Code": error_code},
                                           request=httpx.Request("GET", url)))
    except Exception as exc:  # noqa: BLE001 - returned for the test to inspect
        return exc
    raise AssertionError("hf_raise_for_status raised nothing")


@pytest.mark.parametrize(
    "error, expected",
    [
        (_hub_error(403, "GatedRepo"), "is gated or private: accept its licence on the Hugging Face Hub"),
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


def test_the_hubs_own_gated_error_is_caught_as_a_user_error():
    from huggingface_hub.errors import GatedRepoError

    from stages.errors import UserError
    from stages.modeling import load_errors

    error = _hub_error(403, "GatedRepo")
    assert type(error) is GatedRepoError
    with pytest.raises(UserError, match="data.source = owner/gated-data is gated or private"):
        with load_errors("data.source", "owner/gated-data"):
            raise error


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


def test_accelerates_note_about_an_unsized_dataset_is_dropped_and_nothing_else(caplog, monkeypatch):
    from accelerate import PartialState
    from accelerate.logging import get_logger

    from stages.errors import setup_logging

    for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)  # setup_logging sets them here (no terminal): undone after
    setup_logging()
    PartialState(cpu=True)
    accelerate_log = get_logger("accelerate.accelerator")  # as accelerate's Accelerator logs, "[RANK 0] " first
    with caplog.at_level("INFO"):
        accelerate_log.info("The used dataset had no length, returning gathered tensors. You should drop the "
                            "remainder yourself.")
        accelerate_log.info("another note")
    assert [r.getMessage() for r in caplog.records if r.name == "accelerate.accelerator"] == ["[RANK 0] another note"]
