"""The validate stage on the shipped sample in tmp_path (no workspace, no DVC): what it checks, what it
writes and when it leaves data/validated.txt alone."""

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from stages import validate
from stages.errors import UserError
from stages.params import load_params

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data/sample/pubmedqa_ko_sample.json"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """The shipped params.yaml reading the shipped sample, in tmp_path as the current folder."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["source"] = str(SAMPLE)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _set_models(project: Path, name: str, base_16bit: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["model"].update(name=name, base_16bit=base_16bit)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def test_hub_ids_and_existing_folders_pass(project):
    (project / "llama").mkdir()
    _set_models(project, "owner/model", str(project / "llama"))
    validate.check_model_paths(load_params())
    home = Path("~").expanduser()
    _set_models(project, "owner/model", "~/" + os.path.relpath(project / "llama", home))  # ~ is the home folder
    validate.check_model_paths(load_params())


@pytest.mark.parametrize("key", ["model.name", "model.base_16bit"])
def test_a_missing_model_folder_names_its_key(project, key):
    (project / "llama").mkdir()
    missing = str(project / "no-such-model")
    models = {"model.name": "owner/model", "model.base_16bit": str(project / "llama"), key: missing}
    _set_models(project, models["model.name"], models["model.base_16bit"])
    with pytest.raises(UserError) as found:
        validate.check_model_paths(load_params())
    assert str(found.value) == (f"{key} = {missing}: no such folder; point it at a local model folder or an "
                                "owner/name hub id")


def test_validate_reads_the_source_and_writes_the_same_line_every_time(project, caplog):
    with caplog.at_level(logging.INFO, logger="stages.validate"):
        validate.main()
    written = project / "data" / "validated.txt"
    assert written.read_text(encoding="utf-8") == "params.yaml is valid and data.source is readable\n"
    rows = len(json.loads(SAMPLE.read_text(encoding="utf-8")))
    [line] = [r.getMessage() for r in caplog.records if r.name == "stages.validate"]
    assert line.startswith(f"params.yaml is valid; {SAMPLE} has {rows} rows, ") and line.endswith(" usable")
    usable = int(line.split(", ")[-1].split()[0])
    assert 0 < usable <= rows

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
