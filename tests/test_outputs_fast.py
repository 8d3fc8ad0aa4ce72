"""stages/outputs.py on small files in tmp_path: what each write leaves on disk, byte for byte.

No workspace and no model: these run once per mutant under `make mutate`."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import outputs
from stages.errors import UserError
from stages.outputs import (atomic_dir, check_writable, dumps_json, dvc_md5, jsonl_text, locked_hashes, read_jsonl,
                            remove_stale_temporaries, staged, write_json, write_text)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_are_hidden_siblings_named_after_the_writer(tmp_path):
    final = tmp_path / "models" / "merged"
    assert outputs._temporary_sibling(final, "tmp") == tmp_path / "models" / f".merged.tmp-{os.getpid()}"
    assert outputs._temporary_sibling(final, "old") == tmp_path / "models" / f".merged.old-{os.getpid()}"


def test_a_process_is_alive_until_it_is_gone(monkeypatch):
    assert outputs._alive(os.getpid())
    assert not outputs._alive(_dead_pid())

    def refused(pid, signal):
        raise PermissionError("another user's process")

    monkeypatch.setattr(outputs.os, "kill", refused)
    assert outputs._alive(1)  # it exists: only its owner may signal it


def test_only_the_temporaries_of_dead_writers_are_removed(tmp_path):
    final, dead = tmp_path / "merged", _dead_pid()
    gone = [tmp_path / f".merged.tmp-{dead}", tmp_path / f".merged.old-{dead}"]
    gone[0].mkdir()
    (gone[0] / "shard").write_text("x")
    gone[1].write_text("an old file")
    kept = [
        tmp_path / f".merged.tmp-{os.getpid()}",  # this process's own
        tmp_path / f".merged.tmp-{os.getppid()}",  # a live writer's
        tmp_path / f".merged.bak-{dead}",  # not one of our tags
        tmp_path / ".merged.tmp-x1",  # not a pid
        tmp_path / f".other.tmp-{dead}",  # another output's
        tmp_path / f"merged.tmp-{dead}",  # not hidden: not ours
    ]
    for path in kept:
        path.write_text("keep")
    assert sorted(remove_stale_temporaries(final)) == sorted(gone)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_check_writable_makes_the_folder_and_leaves_nothing(tmp_path):
    check_writable(tmp_path / "a" / "b" / "metrics.json", tmp_path / "c.json")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b"]


def test_an_unwritable_place_is_one_line_naming_the_output(tmp_path):
    (tmp_path / "metrics").write_text("a file where a folder belongs")
    expected = (f"cannot write {tmp_path}/metrics/cost.json: File exists; "
                "check that folder's permissions and free disk space")
    with pytest.raises(UserError) as found:
        check_writable(tmp_path / "ok.json", tmp_path / "metrics" / "cost.json")
    assert str(found.value) == expected
    for write in (lambda out: out.text(tmp_path / "metrics" / "cost.json", "x"),
                  lambda out: out.dir(tmp_path / "metrics" / "cost.json")):
        with pytest.raises(UserError) as found, staged() as out:
            write(out)
        assert str(found.value) == expected


def test_an_error_without_strerror_still_says_what_failed(tmp_path):
    error = outputs._write_error(tmp_path / "x", OSError("disk on fire"))
    assert str(error) == f"cannot write {tmp_path}/x: disk on fire; check that folder's permissions and free disk space"


def test_a_failed_text_write_is_one_line(tmp_path, monkeypatch):
    def full(self, text, encoding=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.Path, "write_text", full)
    with pytest.raises(UserError, match=r"^cannot write .*report.md: no space left on the disk; [\d.]+ \w+ is free on "):
        write_text(tmp_path / "report.md", "text")


def test_a_failed_rename_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    def refused(src, dst):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(outputs.os, "replace", refused)
    with pytest.raises(UserError, match=r"^cannot write .*train.json: Permission denied; check"):
        write_json(tmp_path / "train.json", {"loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_text_and_json_are_written_as_utf_8_with_stable_bytes(tmp_path):
    write_text(tmp_path / "a.txt", "질문: 예\n")
    assert (tmp_path / "a.txt").read_bytes() == "질문: 예\n".encode("utf-8")
    write_json(tmp_path / "m.json", {"b": {"답": 1}, "a": [1.5]})
    assert (tmp_path / "m.json").read_text(encoding="utf-8") == '{\n  "a": [\n    1.5\n  ],\n  "b": {\n    "답": 1\n  }\n}\n'
    assert dumps_json({"b": 1, "a": 2}) == '{\n  "a": 2,\n  "b": 1\n}\n'


def test_outputs_may_go_into_folders_that_do_not_exist_yet(tmp_path):
    write_json(tmp_path / "metrics" / "cost" / "train.json", {})
    with atomic_dir(tmp_path / "models" / "runs" / "adapter") as folder:
        (folder / "w").write_text("w")
    assert (tmp_path / "metrics" / "cost" / "train.json").read_text() == "{}\n"
    assert (tmp_path / "models" / "runs" / "adapter" / "w").read_text() == "w"


def test_a_publish_stopped_between_its_renames_leaves_a_copy_the_next_write_recognises(tmp_path, monkeypatch):
    final = tmp_path / "merged"
    with atomic_dir(final) as folder:
        (folder / "w").write_text("old")
    real = os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda src, dst: real(src, dst) if dst != final else 1 / 0)
    with pytest.raises(ZeroDivisionError), atomic_dir(final) as folder:
        (folder / "w").write_text("new")
    # the old version is left under the one name remove_stale_temporaries knows for it (a later run of
    # another pid removes it); the final path itself is missing until the next successful write
    assert [p.name for p in tmp_path.iterdir()] == [f".merged.old-{os.getpid()}"]


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
    rows = [{"q": "질문", "b": 1}, {"a": None}]
    text = jsonl_text(rows)
    assert text == '{"b": 1, "q": "질문"}\n{"a": null}\n'
    (tmp_path / "rows.jsonl").write_text(text + "\n  \n", encoding="utf-8")
    assert read_jsonl(tmp_path / "rows.jsonl") == rows


def test_a_folder_replaces_the_old_one_and_leaves_no_old_or_tmp_copy(tmp_path):
    final = tmp_path / "models" / "merged"
    for weights in ("old", "new"):
        with atomic_dir(final) as folder:
            assert folder.is_dir() and list(folder.iterdir()) == [] and folder.parent == final.parent
            (folder / "weights").write_text(weights)
    assert (final / "weights").read_text() == "new"
    assert list(final.parent.iterdir()) == [final]


def test_a_stale_temporary_of_this_process_is_cleared_before_staging(tmp_path):
    """A pid is reused: this process may find its own name taken, by a folder or a file."""
    text, folder = tmp_path / "train.json", tmp_path / "adapter"
    outputs._temporary_sibling(text, "tmp").mkdir()
    (outputs._temporary_sibling(text, "tmp") / "x").write_text("stale")
    outputs._temporary_sibling(folder, "tmp").write_text("stale file")
    write_text(text, "new")
    with atomic_dir(folder) as staged_folder:
        assert list(staged_folder.iterdir()) == []
        (staged_folder / "w").write_text("w")
    assert text.read_text() == "new" and (folder / "w").read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "train.json"]


def test_a_failure_inside_the_block_discards_every_staged_output(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "w").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged() as out:
        (out.dir(tmp_path / "adapter") / "w").write_text("new")
        out.text(tmp_path / "a.txt", "new")
        raise KeyboardInterrupt  # a BaseException: Ctrl-C discards too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (tmp_path / "adapter" / "w").read_text() == "old"
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "merged") as folder:
        (folder / "shard").write_text("half")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_failed_publish_puts_every_previous_version_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/w").write_text("old weights")
    (tmp_path / "a.json").write_text("old a")
    real = os.replace

    def last_fails(src, dst):
        if str(dst).endswith("c.json"):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", last_fails)
    with pytest.raises(UserError, match=r"^cannot write c.json: no space left on the disk"), staged() as out:
        (out.dir(Path("adapter")) / "w").write_text("new weights")
        out.text(Path("a.json"), "new a")
        out.text(Path("b.json"), "new b")  # no earlier version: gone again
        out.text(Path("c.json"), "new c")
    assert (tmp_path / "adapter/w").read_text() == "old weights" and (tmp_path / "a.json").read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "adapter", "models"]
    assert list((tmp_path / "models").iterdir()) == []  # no journal left


def test_discard_removes_staged_files_and_folders(tmp_path):
    out = outputs.Staged()
    (out.dir(tmp_path / "adapter") / "w").write_text("w")
    out.text(tmp_path / "a.txt", "a")
    out.discard()
    assert list(tmp_path.iterdir()) == []
    out.publish()  # nothing left to publish
    assert list(tmp_path.iterdir()) == []


def test_locked_hashes_reads_every_stages_outputs(tmp_path):
    lock = tmp_path / "dvc.lock"
    assert locked_hashes(lock) == {}
    lock.write_text("")
    assert locked_hashes(lock) == {}
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "train": {"outs": [{"path": "models/adapter", "md5": "a.dir"}, {"path": "metrics/cost/train.json"}]},
        "validate": {"cmd": "python -m stages.validate"},
        "evaluate": {"outs": [{"path": "metrics/eval.json", "md5": "e"}]},
    }}))
    assert locked_hashes(lock) == {"models/adapter": "a.dir", "metrics/cost/train.json": None, "metrics/eval.json": "e"}
    lock.write_text(yaml.safe_dump({"schema": "2.0"}))
    assert locked_hashes(lock) == {}


def test_locked_hashes_reads_the_workspaces_dvc_lock_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"s": {"outs": [{"path": "p", "md5": "m"}]}}}),
                                      encoding="utf-8")
    assert locked_hashes() == {"p": "m"}


def test_dvc_md5_of_a_file_and_of_a_folder_is_dvcs_own(tmp_path):
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import localfs

    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights").write_bytes(b"\0\1\2" * 100)
    (folder / "b").write_text("bb")
    assert dvc_md5(folder / "b") == hashlib.md5(b"bb").hexdigest()
    _, _, built = build(HashFileDB(localfs, str(tmp_path / "cache")), str(folder), localfs, "md5", dry_run=True)
    assert dvc_md5(folder) == built.hash_info.value and built.hash_info.value.endswith(".dir")
    (folder / "sub" / "weights").write_bytes(b"\0\1\3" * 100)  # the same size, other bytes: another hash
    assert dvc_md5(folder) != built.hash_info.value


def _run(tmp_path, adapter: bytes, seconds: float) -> None:
    with staged() as out:
        (out.dir(tmp_path / "adapter") / "w").write_bytes(adapter)
        out.json(tmp_path / "train.json", {"loss": 1.0})
        out.measurement(tmp_path / "cost.json", {"runtime_s": seconds})


def _lock(tmp_path, paths) -> None:
    outs = [{"path": (tmp_path / path).as_posix(), "md5": dvc_md5(tmp_path / path)} for path in paths]
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"train": {"outs": outs}}}))


def test_a_measurement_is_kept_only_when_every_output_is_reproduced(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.paths, "DVC_LOCK", tmp_path / "dvc.lock")
    monkeypatch.setattr(outputs, "locked_hashes", lambda: locked_hashes(tmp_path / "dvc.lock"))
    _run(tmp_path, b"w", 10.0)
    _lock(tmp_path, ["adapter", "train.json", "cost.json"])
    _run(tmp_path, b"w", 11.0)  # the same adapter and metrics: the recorded measurement stays
    assert json.loads((tmp_path / "cost.json").read_text()) == {"runtime_s": 10.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "cost.json", "dvc.lock", "train.json"]
    (tmp_path / "cost.json").unlink()  # the recorded measurement is gone: write the new one
    _run(tmp_path, b"w", 12.0)
    assert json.loads((tmp_path / "cost.json").read_text()) == {"runtime_s": 12.0}
    _lock(tmp_path, ["adapter", "cost.json"])  # train.json not recorded: not reproduced
    _run(tmp_path, b"w", 13.0)
    assert json.loads((tmp_path / "cost.json").read_text()) == {"runtime_s": 13.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "cost.json", "dvc.lock", "train.json"]


def test_without_a_measurement_dvc_lock_is_not_read(tmp_path, monkeypatch):
    def unreadable():
        raise AssertionError("dvc.lock read for outputs that hold no measurement")

    monkeypatch.setattr(outputs, "locked_hashes", unreadable)
    write_json(tmp_path / "eval.json", {"rougeL": 0.2})
    assert json.loads((tmp_path / "eval.json").read_text()) == {"rougeL": 0.2}


# A stage's publication in a real process, stopped after its first rename by the test's own wrapper:
# SIGKILL (nothing in the process runs), or its own Ctrl-C (SIGINT delivered in the middle).
PUBLISH = """
import os, signal, sys, time
from pathlib import Path
from stages import outputs

how, real = sys.argv[1], os.replace
renamed = []

def replace(src, dst):
    real(src, dst)
    renamed.append(dst)
    if len(renamed) == 2:  # adapter's old version moved aside and the new one in place; a.json not yet
        if how == "kill":
            Path("renamed").touch()
            time.sleep(60)
        else:
            os.kill(os.getpid(), signal.SIGINT)

outputs.os.replace = replace
try:
    with outputs.staged() as out:
        (out.dir(Path("adapter")) / "w").write_text("new weights")
        out.text(Path("a.json"), "new a")
        out.text(Path("b.json"), "new b")
except KeyboardInterrupt:
    print("interrupted after", len(renamed), "renames")
    raise SystemExit(130)
"""


def _previous_result(workspace):
    (workspace / "adapter").mkdir()
    (workspace / "adapter/w").write_text("old weights")
    (workspace / "a.json").write_text("old a")


def _publishing_process(workspace, how):
    import signal

    return subprocess.Popen([sys.executable, "-c", PUBLISH, how], cwd=workspace, text=True, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.getcwd()},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_a_kill_while_outputs_are_replaced_is_rolled_back_by_the_next_write(tmp_path, monkeypatch, caplog):
    import signal
    import time

    _previous_result(tmp_path)
    process = _publishing_process(tmp_path, "kill")
    deadline = time.monotonic() + 60
    while not (tmp_path / "renamed").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (tmp_path / "adapter/w").read_text() == "new weights"  # killed half-way: a mix of two runs
    assert (tmp_path / "a.json").read_text() == "old a"

    monkeypatch.chdir(tmp_path)
    check_writable(Path("adapter"))  # what every stage does first
    assert (tmp_path / "adapter/w").read_text() == "old weights" and (tmp_path / "a.json").read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "adapter", "models", "renamed"]
    assert list((tmp_path / "models").iterdir()) == []
    assert "put every previous version back (adapter, a.json, b.json)" in caplog.text


def test_a_committed_publication_is_finished_by_the_next_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _previous_result(tmp_path)
    with staged() as out:  # the new versions, staged by this process as a stage would
        (out.dir(Path("adapter")) / "w").write_text("new weights")
        out.text(Path("a.json"), "new a")
        # as written by a process that is gone (2**22 + 1: a pid no process has)
        publication = outputs._Publication(out._pairs, journal=Path(f"models/.publishing-{2**22 + 1}.json"))
        publication.moves = [(tmp, final, final.with_name(f".{final.name}.old-{2**22 + 1}"), True)
                             for tmp, final, _, _ in publication.moves]
        publication._write_journal()
        for tmp, final, old, _ in publication.moves:
            os.replace(final, old)
            os.replace(tmp, final)
        publication.commit_mark.touch()  # then killed before deleting the previous versions
        out._pairs = []
    remove_stale_temporaries(Path("a.json"))
    assert (tmp_path / "adapter/w").read_text() == "new weights" and (tmp_path / "a.json").read_text() == "new a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "adapter", "models"]
    assert list((tmp_path / "models").iterdir()) == []


def test_ctrl_c_while_outputs_are_replaced_waits_until_all_are_in_place(tmp_path):
    _previous_result(tmp_path)
    process = _publishing_process(tmp_path, "interrupt")
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 130 and stdout.strip() == "interrupted after 5 renames"
    assert [(tmp_path / name).read_text() for name in ("adapter/w", "a.json", "b.json")] == \
        ["new weights", "new a", "new b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "adapter", "b.json", "models"]


@pytest.mark.parametrize("sig, code, start", [(None, 130, "interrupted"), ("TERM", 143, "terminated (SIGTERM)")])
def test_a_stop_after_the_outputs_are_in_place_says_to_record_them(tmp_path, monkeypatch, capsys, sig, code, start):
    from stages.errors import Terminated, stage_entrypoint

    monkeypatch.chdir(tmp_path)

    @stage_entrypoint
    def stage(publish_first: bool):
        if publish_first:
            write_text(Path("a.txt"), "new")
        raise Terminated() if sig else KeyboardInterrupt()

    for publish_first, rest in ((True, " after this stage had written its new outputs, complete, which dvc.lock "
                                       "does not record yet: run `dvc commit`"),
                                (False, ": no output was replaced; rerun `dvc repro`")):
        with pytest.raises(SystemExit) as stopped:
            stage(publish_first)
        assert stopped.value.code == code
        assert capsys.readouterr().err.startswith(start + rest)
