"""Which checkpoint a train run resumes from, on a folder of fake checkpoints (no model: fast, and
what `make mutate` runs against stages/checkpoints.py). test_resume.py checks the real thing."""

import json
from pathlib import Path

import pytest
import yaml

from stages import checkpoints, paths
from stages.params import Params


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project root with a dvc.yaml, the train stage's modules and prepared splits, as cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stages").mkdir()
    for name in ("train.py", "callbacks.py"):
        (tmp_path / "stages" / name).write_text(f"# {name}\n")
    deps = ["stages/train.py", "stages/callbacks.py", "data/prepared/train.jsonl", "data/prepared/validation.jsonl"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"deps": deps}, "merge": {
        "deps": ["stages/merge.py"]}}}))
    for split in ("train", "validation"):
        paths.split_file(split).parent.mkdir(parents=True, exist_ok=True)
        paths.split_file(split).write_text(json.dumps({"id": split}) + "\n")
    return tmp_path


def _checkpoint(step: int, complete: bool = True, state: bool = True) -> Path:
    """A checkpoint folder with small files of the kinds the Trainer writes and reads back on resume."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    folder = paths.CHECKPOINT_DIR / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"lora_A": torch.zeros(2, 2)}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text("{}")
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    if state:
        (folder / "trainer_state.json").write_text("{}")
    if complete:
        checkpoints.mark_complete(folder, step)
    return folder


def test_stage_code_is_the_python_files_dvc_yaml_lists_for_train(project):
    assert checkpoints.stage_code() == [project / "stages/callbacks.py", project / "stages/train.py"]
    assert checkpoints.stage_code("merge") == [project / "stages/merge.py"]


def test_outside_a_project_the_code_that_runs_is_fingerprinted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here (the benchmarks' scratch workspaces)
    root = Path(checkpoints.__file__).resolve().parents[1]
    assert checkpoints.stage_code() and all(path.is_file() and path.parent == root / "stages"
                                            for path in checkpoints.stage_code())
    assert root / "stages/train.py" in checkpoints.stage_code()


def test_the_fingerprint_changes_with_each_input_and_only_with_them(project, monkeypatch):
    params = Params()
    first = checkpoints.run_fingerprint(params)
    assert first == checkpoints.run_fingerprint(Params()) and len(first) == 64
    changed = {
        "seed": Params(seed=1),
        "model": Params(model={"max_seq_length": 1024}),
        "backend": Params(model={"backend": "transformers"}),
        "4bit": Params(model={"load_in_4bit": False}),
        "name": Params(model={"name": "other/model"}),
        "lora": Params(lora={"alpha": 32}),
        "train": Params(train={"warmup_steps": 0}),
    }
    fingerprints = {key: checkpoints.run_fingerprint(value) for key, value in changed.items()}
    assert first not in fingerprints.values() and len(set(fingerprints.values())) == len(changed)
    assert checkpoints.run_fingerprint(Params(eval={"batch_size": 1}, merge={"dtype": "float32"})) == first
    for path in (paths.split_file("train"), paths.split_file("validation"), project / "stages/callbacks.py"):
        original = path.read_text()
        path.write_text(original + " ")
        assert checkpoints.run_fingerprint(params) != first, path
        path.write_text(original)
    assert checkpoints.run_fingerprint(params) == first
    monkeypatch.setattr(checkpoints, "library_versions", lambda: {"torch": "0"})
    assert checkpoints.run_fingerprint(params) != first


def test_library_versions_names_installed_libraries_only():
    found = checkpoints.library_versions()
    assert {"torch", "transformers", "trl", "peft"} <= set(found) and "unsloth" not in found  # no GPU extra here
    assert all(isinstance(v, str) and v[0].isdigit() for v in found.values())


def test_the_last_complete_checkpoint_in_step_order(project, caplog):
    _checkpoint(2), _checkpoint(10), _checkpoint(9)
    _checkpoint(12, complete=False)  # killed while saving
    _checkpoint(11, state=False)  # marked but without the trainer's state: not resumable either
    (paths.CHECKPOINT_DIR / "checkpoint-x").mkdir()
    (paths.CHECKPOINT_DIR / "checkpoint-13").write_text("a file, not a folder")
    with caplog.at_level("WARNING", logger="stages.train"):
        assert checkpoints.last_complete_checkpoint() == paths.CHECKPOINT_DIR / "checkpoint-10"
    assert caplog.messages == [
        f"skipping models/checkpoints/checkpoint-{step}: its save did not finish (the run was stopped while writing "
        "it); resuming from checkpoint-10" for step in (12, 11)]
    assert json.loads((paths.CHECKPOINT_DIR / "checkpoint-10" / checkpoints.COMPLETE_MARK).read_text()) == {"step": 10}
    assert checkpoints.last_complete_checkpoint(project / "nowhere") is None


def test_resume_needs_the_same_fingerprint_and_a_complete_checkpoint(project, caplog):
    assert checkpoints.checkpoint_to_resume("a") is None  # nothing yet: a clean start, stamped
    assert (paths.CHECKPOINT_DIR / checkpoints.FINGERPRINT_FILE).read_text() == "a"
    _checkpoint(4)
    with caplog.at_level("INFO", logger="stages.train"):
        assert checkpoints.checkpoint_to_resume("a") == str(paths.CHECKPOINT_DIR / "checkpoint-4")
    assert caplog.messages == ["resuming from models/checkpoints/checkpoint-4 (an interrupted run with the same "
                               "params, data, code and libraries)"]
    assert (paths.CHECKPOINT_DIR / "checkpoint-4").is_dir()  # kept for the Trainer to load

    caplog.clear()
    with caplog.at_level("INFO", logger="stages.train"):
        assert checkpoints.checkpoint_to_resume("b") is None  # something changed: start clean
    assert caplog.messages == ["not resuming models/checkpoints: params, data, code or libraries changed since it "
                               "was written"]
    assert sorted(p.name for p in paths.CHECKPOINT_DIR.iterdir()) == [checkpoints.FINGERPRINT_FILE]
    assert (paths.CHECKPOINT_DIR / checkpoints.FINGERPRINT_FILE).read_text() == "b"

    _checkpoint(2, complete=False)
    assert checkpoints.checkpoint_to_resume("b") is None  # only a partial one: start clean, cleared
    assert not (paths.CHECKPOINT_DIR / "checkpoint-2").exists()


def test_clear_removes_everything_and_tolerates_nothing_there(project):
    _checkpoint(2)
    checkpoints.clear()
    assert not paths.CHECKPOINT_DIR.exists()
    checkpoints.clear()


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{}"),
     "adapter_model.safetensors does not load (invalid header length)"),
    (lambda f: (f / "optimizer.pt").write_bytes((f / "optimizer.pt").read_bytes()[:100]),
     "optimizer.pt does not load (not a whole torch file: cut short or overwritten)"),
    (lambda f: (f / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (lambda f: (f / "trainer_state.json").write_text('{"global_step": '),
     "trainer_state.json does not load (Expecting value: line 1 column 17 (char 16))"),
], ids=["weights", "optimizer", "scheduler-missing", "trainer-state"])
def test_a_checkpoint_that_does_not_load_is_removed_for_the_one_before(project, caplog, damage, reason):
    _checkpoint(2), damage(_checkpoint(4))
    with caplog.at_level("WARNING", logger="stages.train"):
        assert checkpoints.last_complete_checkpoint() == paths.CHECKPOINT_DIR / "checkpoint-2"
    assert caplog.messages == [f"skipping models/checkpoints/checkpoint-4: {reason}; removed it; resuming from checkpoint-2"]
    assert not (paths.CHECKPOINT_DIR / "checkpoint-4").exists()  # a later save there starts with no stale mark


def test_with_no_checkpoint_that_loads_training_starts_from_step_zero(project, caplog):
    checkpoints.checkpoint_to_resume("a")
    (_checkpoint(2) / "rng_state.pth").write_bytes(b"")
    with caplog.at_level("INFO", logger="stages.train"):
        assert checkpoints.checkpoint_to_resume("a") is None
    assert caplog.messages == ["skipping models/checkpoints/checkpoint-2: rng_state.pth does not load (not a whole "
                               "torch file: cut short or overwritten); removed it; no complete checkpoint left: "
                               "training starts from step 0"]
    assert sorted(p.name for p in paths.CHECKPOINT_DIR.iterdir()) == [checkpoints.FINGERPRINT_FILE]
