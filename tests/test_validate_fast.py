"""The validate stage on the shipped sample in tmp_path (no workspace, no DVC): what it checks, what it
writes and when it leaves data/validated.txt alone."""

import json
import logging
import os
import re
from pathlib import Path

import pytest
import yaml

from stages import preflight, validate
from stages.errors import UserError
from stages.params import load_params

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data/sample/pubmedqa_ko_sample.json"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """The shipped params.yaml reading the shipped sample, in tmp_path as the current folder, with
    full-precision weights: the shipped 4-bit ones need CUDA, which validate asks for (below)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["source"] = str(SAMPLE)
    params["model"]["load_in_4bit"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _set_models(project: Path, name: str, base_16bit: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["model"].update(name=name, base_16bit=base_16bit)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def test_hub_ids_and_model_folders_pass(project, tiny_model):
    _set_models(project, "owner/model", str(tiny_model))
    configs = preflight.model_configs(load_params())
    assert list(configs) == ["model.base_16bit"]  # a hub id not in the cache: nothing to check against
    assert configs["model.base_16bit"][1].hidden_size == 64
    home = Path("~").expanduser()
    _set_models(project, "owner/model", "~/" + os.path.relpath(tiny_model, home))  # ~ is the home folder
    assert list(preflight.model_configs(load_params())) == ["model.base_16bit"]


@pytest.mark.parametrize("key", ["model.name", "model.base_16bit"])
def test_a_missing_model_folder_names_its_key(project, key):
    (project / "llama").mkdir()
    missing = str(project / "no-such-model")
    models = {"model.name": "owner/model", "model.base_16bit": str(project / "llama"), key: missing}
    _set_models(project, models["model.name"], models["model.base_16bit"])
    with pytest.raises(UserError) as found:
        preflight.model_configs(load_params())
    assert str(found.value) == (f"{key} = {missing}: no such folder; point it at a local model folder or an "
                                "owner/name hub id")


def test_validate_reads_the_source_and_writes_the_same_line_every_time(project, caplog):
    with caplog.at_level(logging.INFO, logger="stages.validate"):
        validate.main()
    written = project / "data" / "validated.txt"
    assert written.read_text(encoding="utf-8") == "params.yaml is valid and data.source is readable\n"
    rows = len(json.loads(SAMPLE.read_text(encoding="utf-8")))
    [line] = [r.getMessage() for r in caplog.records if r.name == "stages.validate"]
    said = re.fullmatch(rf"params.yaml is valid; {re.escape(str(SAMPLE))} has {rows} rows, (\d+) usable: "
                        r"train/validation/test at most (\d+)/(\d+)/(\d+)", line)
    usable, *splits = map(int, said.groups())
    assert 0 < usable <= rows and sum(splits) == usable and splits[1] == splits[2] == round(0.1 * usable)

    os.utime(written, (1, 1))  # the same text: left as it is, so nothing downstream reruns
    validate.main()
    assert written.stat().st_mtime == 1
    written.write_text("stale\n", encoding="utf-8")
    validate.main()
    assert written.read_text(encoding="utf-8") == validate.VALIDATED_TEXT
    assert sorted(p.name for p in written.parent.iterdir()) == ["validated.txt"]  # no temporary left


def test_a_bad_source_fails_before_anything_is_written(project, capsys):
    _set_models(project, "owner/model", str(project / "missing-16bit"))
    with pytest.raises(SystemExit) as stopped:
        validate.main()
    assert stopped.value.code == 2
    assert f"error: model.base_16bit = {project / 'missing-16bit'}: no such folder" in capsys.readouterr().err
    assert not (project / "data").exists()

    _set_models(project, "owner/model", "owner/model-16bit")
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["source"] = str(project / "empty.json")
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    (project / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(SystemExit):
        validate.main()
    assert "error: data.source holds no rows" in capsys.readouterr().err
    assert not (project / "data").exists()


def _set(project: Path, **sections) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def test_the_shipped_params_on_a_cpu_say_which_settings_run_there(project, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _set(project, model={"load_in_4bit": True})  # as shipped
    with pytest.raises(SystemExit) as stopped:
        validate.main()
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and error.startswith(
        "error: model.load_in_4bit = true needs a CUDA GPU (bitsandbytes NF4); this machine has none. On a CPU set "
        "-S model.load_in_4bit=false -S model.name=unsloth/Meta-Llama-3.1-8B-Instruct (full precision")
    assert not (project / "data").exists()
    _set(project, model={"load_in_4bit": False, "name": "unsloth/Meta-Llama-3.1-8B-Instruct"})
    validate.main()  # what it said to set is enough


def _cache_config(cache: Path, repo: str, config: dict) -> None:
    """A model's config.json in a Hugging Face cache, laid out as the hub client writes it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots/abc123").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs/main").write_text("abc123")
    (folder / "snapshots/abc123/config.json").write_text(json.dumps(config))


def test_a_hub_models_cached_config_bounds_the_params_and_an_uncached_one_is_skipped(project, tiny_model,
                                                                                   tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    _cache_config(cache, "owner/cached", json.loads((tiny_model / "config.json").read_text()))
    _set(project, model={"name": "owner/cached", "base_16bit": "owner/not-downloaded"}, lora={"r": 65})
    configs = preflight.model_configs(load_params())
    assert list(configs) == ["model.name"] and configs["model.name"][0] == "owner/cached"
    with pytest.raises(UserError) as found:
        preflight.check_model_limits(load_params(), configs)
    assert str(found.value) == ("lora.r = 65: more than model.name = owner/cached allows (its config's hidden_size "
                                "is 64); set -S lora.r=64 or lower")
    _set(project, lora={"r": 64})
    preflight.check_model_limits(load_params(), configs)  # the edge itself is accepted
    _set(project, model={"name": "owner/not-downloaded"}, lora={"r": 10**12})
    assert preflight.model_configs(load_params()) == {}  # offline and not cached: nothing to bound against


def test_each_bound_accepts_its_edge(project, tiny_model, capsys):
    _set(project, model={"name": str(tiny_model), "base_16bit": str(tiny_model), "max_seq_length": 4096},
         eval={"max_new_tokens": 4096, "batch_size": 49}, lora={"r": 64},
         train={"per_device_train_batch_size": 39, "per_device_eval_batch_size": 49})
    validate.main()  # 4096 positions, hidden size 64; 49 usable rows of the sample, 39 of them for train
    for section, key, value in (("model", "max_seq_length", 4097), ("eval", "max_new_tokens", 4097),
                                ("lora", "r", 65), ("eval", "batch_size", 50),
                                ("train", "per_device_train_batch_size", 40),
                                ("train", "per_device_eval_batch_size", 50)):
        _set(project, **{section: {key: value}})
        with pytest.raises(SystemExit):
            validate.main()
        assert f"error: {section}.{key} = {value}: more than " in capsys.readouterr().err
        _set(project, **{section: {key: value - 1}})


def test_more_processes_than_gpus_is_refused_at_validate(project, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _set(project, train={"num_processes": 4})
    with pytest.raises(UserError, match=r"train.num_processes = 4 but this machine has 2 CUDA GPU\(s\); set "
                                        r"-S train.num_processes=2"):
        preflight.check_machine(load_params())
    _set(project, train={"num_processes": 2})
    preflight.check_machine(load_params())
