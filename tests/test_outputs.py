"""Outputs are replaced together or not at all, write failures are one line, killed runs' leftovers go."""

import json
import subprocess
import sys

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
