"""dvc.yaml agrees with the code: params each stage reads, modules it uses, paths it writes."""

import ast
import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from stages import paths
from stages.params import load_params

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
# Shared plumbing that never changes what a stage computes: no dvc.yaml dep needed.
PLUMBING = {"errors", "cli", "params", "paths", "outputs", "__init__"}
WHOLE_FILE = [{"params.yaml": None}]  # dvc.yaml's way to depend on every param


class ParamsRecorder:
    """Stands in for Params and records the dotted path of every value a stage reads."""

    def __init__(self, target, path, seen):
        self._target, self._path, self._seen = target, path, seen

    def __getattr__(self, name):
        value = getattr(self._target, name)
        dotted = f"{self._path}.{name}" if self._path else name
        if isinstance(value, BaseModel):
            return ParamsRecorder(value, dotted, self._seen)
        self._seen.add(dotted)
        return value

    def __repr__(self):  # a whole section was read (e.g. hashed for the resume fingerprint)
        self._seen.add(self._path)
        return repr(self._target)

    def model_copy(self, **kwargs):
        self._seen.add(self._path)
        return self._target.model_copy(**kwargs)


def _covered(key, declared):
    if declared == WHOLE_FILE:
        return True
    return any(key == d or key.startswith(d + ".") for d in declared)


TEMPORARY = re.compile(r"\.([^/]+)\.(?:tmp|old)-\d+")  # stages/outputs.py's name for a staged output


class FilesRead:
    """The files each stage opens for reading inside a workspace, relative to it.

    An audit hook (PEP 578) sees every open() and os.open() in this process, whichever library
    makes it (json, datasets, transformers, DVC): what the stage's code really reads, where a list
    kept by hand would drift. Hooks cannot be removed; this one does nothing while `stage` is None.
    """

    def __init__(self, root: Path):
        self.root, self.stage, self.read = os.path.realpath(root), None, {}
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if event != "open" or self.stage is None or isinstance(args[0], int) or args[0] is None:
            return
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else flags & (os.O_WRONLY | os.O_RDWR)
        full = os.path.realpath(os.fsdecode(path))
        # A path relative to a dir_fd resolves to nothing that exists here, or to an unrelated folder
        # (shutil.rmtree opens each subfolder by name): left out, as are folders, whose files are
        # opened one by one anyway.
        if not writing and full.startswith(self.root + os.sep) and os.path.isfile(full):
            relative = Path(os.path.relpath(full, self.root)).as_posix()
            self.read.setdefault(self.stage, set()).add(TEMPORARY.sub(r"\1", relative))


@pytest.fixture(scope="module")
def recorded(smoke_template, tmp_path_factory):
    """Every stage run once in a copy of the smoke workspace: the dotted params each reads and the
    files it opens for reading."""
    import shutil

    from stages import evaluate, evaluate_base, merge, plots, prepare, train, validate

    dest = tmp_path_factory.mktemp("recorded") / "ws"
    shutil.copytree(smoke_template, dest, symlinks=True)
    previous, read, files = os.getcwd(), {}, FilesRead(dest)
    os.chdir(dest)
    try:
        for module in (validate, prepare, train, merge, evaluate_base, evaluate, plots):
            name = module.__name__.split(".")[-1]
            read[name] = set()
            original = module.load_params
            module.load_params = lambda path=paths.PARAMS_FILE, seen=read[name]: ParamsRecorder(
                load_params(path), "", seen)
            files.stage = name
            try:
                module.main([]) if module is plots else module.main()
            finally:
                files.stage = None
                module.load_params = original
    finally:
        os.chdir(previous)
    return {"params": read, "files": files.read, "params_file": load_params(dest / "params.yaml")}


@pytest.fixture(scope="module")
def params_read(recorded):
    return recorded["params"]


def test_every_output_persists_so_dvc_never_deletes_the_last_result_before_a_stage_runs():
    # Without persist, DVC deletes a stage's outputs before running it: a failure or Ctrl-C inside the
    # stage then costs the last adapter, metrics and curves (the stages replace their outputs only at the end).
    outputs = [(name, out) for name, stage in DVC.items() for kind in ("outs", "metrics", "plots")
               for out in stage.get(kind, [])]
    assert len(outputs) == 21
    assert [(name, out) for name, out in outputs if not (isinstance(out, dict) and
                                                          next(iter(out.values())).get("persist") is True)] == []


def test_only_validate_depends_on_every_param():
    # It validates the whole file, so it must rerun (and fail first) whenever any param changes.
    assert [name for name, stage in DVC.items() if stage.get("params") == WHOLE_FILE] == ["validate"]
    assert list(DVC)[0] == "validate" and "data/validated.txt" in DVC["prepare"]["deps"]
    assert DVC["validate"]["outs"] == [{"data/validated.txt": {"cache": False, "persist": True}}]


@pytest.mark.parametrize("stage", [name for name, stage in DVC.items() if stage.get("params") != WHOLE_FILE])
def test_every_param_a_stage_reads_is_declared_and_nothing_more(params_read, stage):
    declared = DVC[stage].get("params", [])
    read = params_read[stage]
    assert {key for key in read if not _covered(key, declared)} == set(), "read but not declared"
    unread = [d for d in declared if not any(k == d or k.startswith(d + ".") or d.startswith(k + ".") for k in read)]
    assert unread == [], "declared but never read"


# Opened by stages but not data a dep could name: params.yaml (keys checked above), DVC's and git's own files.
NOT_DATA = ("params.yaml", "dvc.yaml", "dvc.lock", ".dvcignore", ".dvc/", ".git/")
NOT_DATA_NAMES = (".gitignore",)
ORDER_ONLY = {"data/validated.txt"}  # prepare's dep so that validate runs first; never read


def _under(path: str, folders) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def _names(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


@pytest.mark.parametrize("stage", list(DVC))
def test_every_file_a_stage_reads_is_a_dependency_and_every_data_dep_is_read(recorded, stage):
    # A file read but not declared: DVC never reruns the stage when it changes (evaluate_base without
    # data/prepared/test.jsonl keeps a baseline of other questions, and every delta against it is wrong).
    params, deps = recorded["params_file"], DVC[stage]["deps"]
    own = _names(DVC[stage].get("outs", []) + DVC[stage].get("metrics", []) + DVC[stage].get("plots", []))
    # Named by params, not by dvc.yaml: hub ids in the shipped params.yaml, local folders in the smoke workspace.
    by_params = [params.data.source, params.model.name, params.model.base_16bit]
    # train's own state: the checkpoints of an unfinished run (deliberately no output) and the curves
    # so far, beside them (stages/callbacks.py)
    private = [str(paths.CHECKPOINT_DIR)] if stage == "train" else []
    read = {f for f in recorded["files"].get(stage, set())
            if not (f.startswith(NOT_DATA) or f.endswith(".dvc") or Path(f).name in NOT_DATA_NAMES
                    or Path(f).name.startswith(".publishing-")  # the journal of outputs being replaced
                    or _under(f, own + by_params + private))}
    assert {f for f in read if not _under(f, deps)} == set(), "read but not a dependency"
    data_deps = [d for d in deps if not d.startswith("stages/") and d not in ORDER_ONLY]
    assert [d for d in data_deps if not any(_under(f, [d]) for f in read)] == [], "a dependency never read"


def test_a_lora_change_reruns_train_merge_evaluate_but_not_prepare():
    depends_on_lora = {name for name, stage in DVC.items() if _covered("lora.r", stage.get("params", []))}
    assert depends_on_lora == {"validate", "train"}  # validate's output never changes: it reruns nothing
    assert "models/adapter" in DVC["merge"]["deps"] and "models/merged" in DVC["evaluate"]["deps"]
    assert not any(d.startswith("models/") for d in DVC["evaluate_base"]["deps"])


def test_report_and_bootstrap_settings_rerun_evaluate_but_never_the_base_model():
    for key in ("eval.report_examples", "eval.bootstrap_samples"):
        assert _covered(key, DVC["evaluate"]["params"]) and not _covered(key, DVC["evaluate_base"]["params"])
    for key in ("eval.decision_options", "eval.decision_instruction", "eval.max_new_tokens"):
        assert _covered(key, DVC["evaluate"]["params"]) and _covered(key, DVC["evaluate_base"]["params"])


def _stage_modules(module: str, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    tree = ast.parse((ROOT / "stages" / f"{module}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module == "stages":
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
            names = [node.module.split(".")[1]]
        for name in names:
            if name not in seen and (ROOT / "stages" / f"{name}.py").exists():
                seen.add(name)
                _stage_modules(name, seen)
    return seen


@pytest.mark.parametrize("stage", list(DVC))
def test_every_module_a_stage_runs_is_a_dependency(stage):
    assert DVC[stage]["cmd"] == f"python -m stages.{stage}"
    needed = {f"stages/{m}.py" for m in _stage_modules(stage) | {stage} if m not in PLUMBING}
    assert needed - set(DVC[stage]["deps"]) == set()


def test_outputs_in_dvc_yaml_match_stages_paths():
    def outs(stage, kind):
        return {next(iter(o)) if isinstance(o, dict) else o for o in DVC[stage].get(kind, [])}

    assert outs("prepare", "outs") == {str(paths.PREPARED_DIR), str(paths.PREPARE_INFO)}
    assert outs("prepare", "metrics") == set()  # counters and hashes are facts, not metrics to compare
    assert outs("validate", "outs") == {str(paths.VALIDATED)}
    assert outs("train", "outs") == {str(paths.ADAPTER_DIR), str(paths.TRAIN_INFO)}
    assert outs("train", "metrics") == {str(paths.TRAIN_METRICS), str(paths.TRAIN_COST)}
    assert not str(paths.CHECKPOINT_DIR).startswith(tuple(outs("train", "outs")))  # never a DVC output
    assert outs("train", "plots") == {str(paths.TRAIN_CURVES)}
    assert outs("merge", "outs") == {str(paths.MERGED_DIR)}
    assert outs("evaluate_base", "metrics") == {str(paths.EVAL_BASE_METRICS), str(paths.EVAL_BASE_COST)}
    assert outs("evaluate_base", "outs") == {str(paths.BASE_PREDICTIONS), str(paths.EVAL_BASE_INFO)}
    assert outs("evaluate", "metrics") == {str(paths.EVAL_METRICS), str(paths.EVAL_COST)}
    assert outs("evaluate", "outs") == {str(paths.PREDICTIONS), str(paths.REPORT), str(paths.EVAL_INFO),
                                        str(paths.DECISION_PLOT), str(paths.ROUGE_PLOT)}
    assert outs("plots", "outs") == {str(paths.PLOTS_DIR)}


def test_top_level_plots_read_files_the_evaluate_stage_writes():
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    by_title = {title: spec for plot in plots for title, spec in plot.items()}
    files = {file for spec in by_title.values() for axis in ("x", "y") if isinstance(spec[axis], dict)
             for file in spec[axis]}
    assert {str(paths.DECISION_PLOT), str(paths.ROUGE_PLOT)} <= files
    assert sorted(spec["template"] for spec in by_title.values()) == ["confusion", "confusion", "linear", "scatter"]


def test_the_plots_stage_depends_on_every_file_it_draws():
    # Otherwise new evaluation results would leave stale PNGs in git until something else reran it.
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    files = {file for plot in plots for spec in plot.values() for axis in ("x", "y")
             if isinstance(spec[axis], dict) for file in spec[axis]}
    files |= {next(iter(p)) if isinstance(p, dict) else p for stage in DVC.values() for p in stage.get("plots", [])}
    deps = DVC["plots"]["deps"]
    assert {f for f in files if not any(f == d or f.startswith(d + "/") for d in deps)} == set()
