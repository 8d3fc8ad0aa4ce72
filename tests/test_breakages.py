"""tools/breakages.py, without running the audit: its table matches the code and its tests, and it
reports a stale entry instead of running it."""

from pathlib import Path

from tools import breakages
from tools.breakages import BREAKAGES, Breakage, main, occurrences

ROOT = Path(__file__).resolve().parents[1]


def test_every_breakage_is_found_once_and_names_tests_that_exist():
    assert len({b.name for b in BREAKAGES}) == len(BREAKAGES)
    for b in BREAKAGES:
        assert occurrences(b) == 1, f"{b.name}: its old text is no longer in {b.file} exactly once"
        assert b.old != b.new and b.tests
        for node in b.tests:
            file, _, test = node.partition("::")
            assert f"def {test.split('[')[0]}(" in (ROOT / file).read_text(encoding="utf-8"), node


def test_list_prints_every_breakage_and_its_tests(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for b in BREAKAGES:
        assert f"{b.name}  {b.file}\n" in out and all(f"    {test}\n" in out for test in b.tests)
        assert (f"    (equivalent: {b.equivalent})\n" in out) == bool(b.equivalent)


def test_a_stale_entry_fails_the_audit_without_running_anything(monkeypatch, capsys):
    stale = Breakage("moved-on", "stages/outputs.py", "text that is not there", "x", ("tests/test_outputs.py",))
    monkeypatch.setattr(breakages, "BREAKAGES", [stale])
    monkeypatch.setattr(breakages.subprocess, "run", None)  # pytest must not be started
    assert main(["--only", "moved-on"]) == 1
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["moved-on", "stages/outputs.py", "stale"]
    assert main(["--only", "no-such-breakage"]) == 2
