"""Outputs are replaced together or not at all, write failures are one line, killed runs' leftovers go."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages import merge, paths, prepare, train
from stages.errors import UserError
from stages.outputs import atomic_dir, check_writable, remove_stale_temporaries, staged


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_failure_while_staging_leaves_the_old_pair(tmp_path):
    adapter, metrics = tmp_path / "adapter", tmp_path / "metrics.json"
    with staged() as out:
        (out.dir(adapter) / "weights").write_text("old")
        out.json(metrics, {"loss": 1.0})
    with pytest.raises(TypeError):
        with staged() as out:
            (out.dir(adapter) / "weights").write_text("new")
            out.json(metrics, {"loss": object()})  # not JSON: fails after the adapter was staged
    assert (adapter / "weights").read_text() == "old"
    assert json.loads(metrics.read_text()) == {"loss": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "metrics.json"]  # no temporary left


def test_replacing_a_folder_and_its_metrics_leaves_no_temporary_behind(tmp_path):
    # The replaced folder is first renamed to .adapter.old-<pid> (a folder cannot be renamed over a
    # non-empty one): for the merged 8B model that copy is 16 GB, so it must go once the new one is in place.
    adapter, metrics = tmp_path / "adapter", tmp_path / "metrics.json"
    for weights in ("first", "second"):
        with staged() as out:
            (out.dir(adapter) / "weights").write_text(weights)
            out.json(metrics, {"weights": weights})
    assert (adapter / "weights").read_text() == "second" and json.loads(metrics.read_text()) == {"weights": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "metrics.json"]  # no .old- or .tmp- left


def test_the_artefact_is_renamed_into_place_before_its_metrics(tmp_path, monkeypatch):
    import os

    order = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(os.path.basename(dst)), real_replace(src, dst)))
    with staged() as out:
        out.dir(tmp_path / "adapter")
        out.json(tmp_path / "train.json", {})
    assert order == ["adapter", "train.json"]


def test_temporaries_of_killed_runs_are_removed_by_the_next_write(tmp_path):
    final = tmp_path / "merged"
    killed = tmp_path / f".merged.tmp-{_dead_pid()}"
    (killed / "shard").parent.mkdir()
    (killed / "shard").write_text("16 GB of a killed merge")
    alive = tmp_path / f".merged.tmp-{subprocess.os.getppid()}"  # a live process's: left alone
    alive.mkdir()
    with atomic_dir(final) as folder:
        (folder / "config.json").write_text("{}")
    assert not killed.exists() and alive.exists()
    assert remove_stale_temporaries(final) == []


def test_an_unwritable_output_fails_in_one_line_before_any_work(workspace, capsys):
    prepare.main()
    (workspace / "metrics/cost").write_text("a file where a folder belongs")
    with pytest.raises(SystemExit) as stopped:
        train.main()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: cannot write metrics/cost/train.json: File exists; check that folder's permissions and free disk space"]
    assert not paths.ADAPTER_DIR.exists() and not paths.CHECKPOINT_DIR.exists()  # no model was loaded or trained
    with pytest.raises(UserError, match="cannot write metrics/cost/x.json"):
        check_writable(paths.METRICS_DIR / "cost/x.json")


def test_a_killed_merge_leaves_nothing_behind_after_the_next_merge(pipeline_run, monkeypatch):
    monkeypatch.chdir(pipeline_run)
    leftover = paths.MERGED_DIR.parent / f".merged.tmp-{_dead_pid()}"
    leftover.mkdir()
    (leftover / "model-00001-of-00004.safetensors").write_bytes(b"\0" * 1024)
    before = (paths.MERGED_DIR / "model.safetensors").read_bytes()
    merge.main()
    assert not leftover.exists()
    assert (paths.MERGED_DIR / "model.safetensors").read_bytes() == before


def _lock(tmp_path, outputs: dict) -> None:
    """A dvc.lock recording these outputs' current hashes, as `dvc repro` writes it."""
    import yaml

    from stages.outputs import dvc_md5

    outs = [{"path": path, "hash": "md5", "md5": dvc_md5(tmp_path / path)} for path in outputs]
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": {"outs": outs}}}))


def _run(adapter_bytes: bytes, seconds: float) -> None:
    """A train-like stage: DVC deletes the adapter and metrics before it runs, never the persisted cost."""
    import shutil

    shutil.rmtree("adapter", ignore_errors=True)
    with staged() as out:
        (out.dir(Path("adapter")) / "weights").write_bytes(adapter_bytes)
        out.json(Path("train.json"), {"loss": 1.0})
        out.measurement(Path("cost.json"), {"runtime_s": seconds})


def test_a_rerun_that_reproduces_the_locked_outputs_keeps_their_cost(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="stages.outputs")
    _run(b"w1", 10.0)  # no dvc.lock yet: the measurement is written
    assert json.loads((tmp_path / "cost.json").read_text()) == {"runtime_s": 10.0}
    _lock(tmp_path, ["adapter", "train.json", "cost.json"])
    assert not caplog.records

    _run(b"w1", 12.5)  # bit for bit the same result: the earlier measurement stays, bytes and all
    assert json.loads((tmp_path / "cost.json").read_text()) == {"runtime_s": 10.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "cost.json", "dvc.lock", "models", "train.json"]
    # and the log says so, in one line: a cost file left as it was is no surprise
    [kept] = caplog.records
    assert kept.levelname == "INFO" and kept.getMessage().startswith("kept cost.json as dvc.lock records it")
    caplog.clear()

    _run(b"w2", 14.0)  # another adapter: a new measurement
    assert json.loads((tmp_path / "cost.json").read_text()) == {"runtime_s": 14.0}
    assert not caplog.records
    (tmp_path / "cost.json").write_text('{"runtime_s": 99.0}')  # not what dvc.lock records: replaced
    _lock(tmp_path, ["adapter", "train.json"])
    _run(b"w2", 15.0)
    assert json.loads((tmp_path / "cost.json").read_text()) == {"runtime_s": 15.0}


def test_dvc_md5_is_the_hash_dvc_lock_records(pipeline_run, monkeypatch):
    """The rule above compares with dvc.lock, so the hashes must be DVC's own, folders included."""
    from dvc_data.hashfile.hash import hash_file
    from dvc_objects.fs import localfs

    from stages.outputs import dvc_md5

    for path in (pipeline_run / "models/adapter/adapter_config.json", pipeline_run / "metrics/train.json"):
        assert dvc_md5(path) == hash_file(str(path), localfs, "md5")[1].value
    from dvc.repo import Repo

    monkeypatch.chdir(pipeline_run)
    with Repo(".") as repo:
        [stage] = repo.stage.collect("train")
        stage.save()  # DVC hashes the outputs as `dvc commit` would
        [adapter] = [out for out in stage.outs if out.def_path == "models/adapter"]
        assert dvc_md5(pipeline_run / "models/adapter") == adapter.hash_info.value
