"""Shared fixtures: a tiny Llama-shaped model, a smoke workspace and a pipeline run, each built once and
shared by every test process (pytest-xdist workers) and every later run of the same code; a `make smoke`
run, once per test process; a stand-in for unsloth_zoo's offload helpers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data/sample/pubmedqa_ko_sample.json"

# Tests never reach the Hugging Face Hub: everything they load is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

# What the shared builds below are made from: a change to any of these builds them again.
BUILT_FROM = ("stages", "tools", "dvc.yaml", "params.yaml", "data/sample", ".dvcignore", "Makefile",
              "constraints.txt", "pyproject.toml", "tests/conftest.py")


def inputs_key() -> str:
    """A hash of the code, data and libraries the shared builds come from (and the mutant under test,
    as mutmut switches mutants by environment variable, not by file)."""
    from importlib import metadata

    digest = hashlib.sha256(f"{sys.version}\n{os.environ.get('MUTANT_UNDER_TEST', '')}\n".encode())
    for name in BUILT_FROM:
        path = ROOT / name
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if path.is_dir() \
            else [path] if path.exists() else []
        for file in files:
            digest.update(f"{file.relative_to(ROOT)}\n".encode() + hashlib.sha256(file.read_bytes()).digest())
    versions = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"])
    digest.update("\n".join(versions).encode())
    return digest.hexdigest()[:16]


# pytest-xdist (pyproject's addopts: -n auto --dist loadfile) sends each group below to one worker,
# whole. A group is a test file, so its module-scoped fixtures (a `dvc repro`, a reference training)
# are built once; these files launch several training processes and share one group, so no two
# launches race for a rendezvous port.
LAUNCH_PROCESSES = ("test_multiprocess.py", "test_bench_parallel.py")
# These files share one `make smoke` run (the smoke_run fixture, built once per process).
MAKE_SMOKE = ("test_workflow.py", "test_docs.py")
# The longest chains of dependent tests start first, so the other workers take everything else meanwhile.
LONGEST_FIRST = ("test_workflow.py", "test_docs.py", "test_resume.py", "test_nothing_lost.py", "test_families.py",
                 "test_multiprocess.py", "test_bench_parallel.py")


def xdist_group_of(nodeid: str) -> str:
    name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return "launch-processes" if name in LAUNCH_PROCESSES else "make-smoke" if name in MAKE_SMOKE else name


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the groups above for files (xdist's own `--dist loadgroup` reads xdist_group
    marks through a node id that pytest 9 no longer lets it change, so it splits the groups)."""
    from xdist.scheduler import LoadScopeScheduling

    if config.getvalue("dist") != "loadfile":
        return None

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid)

    return ByGroup(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """`pytest --cache-clear` empties the cache once, in the controller, before the workers start: a worker
    that cleared it again would delete what another worker is building."""
    if hasattr(config, "workerinput"):
        config.option.cacheclear = False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`make mutate` runs pytest inside mutmut's own process, which must see every test: no workers."""
    return 0 if "mutmut" in sys.modules else None


@pytest.fixture(scope="session")
def build_cache(request, tmp_path_factory) -> Path:
    """Where shared builds live: pytest's cache folder (kept between runs; `pytest --cache-clear` empties
    it), else this run's temporary root, which every xdist worker of the run shares."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider (make mutate)
    if cache is not None:
        return cache.mkdir("shared-builds")
    return tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") \
        else tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def shared(build_cache, tmp_path_factory):
    """shared(name, build) -> a private copy of what build(dest) writes, built once for all processes.

    The build happens under a file lock, in the first process that asks, into a temporary folder renamed
    into place when done; an entry from other code or libraries (another key) is removed. Each test
    session copies the entry, so no test can change what the next process or run gets.
    """
    from filelock import FileLock

    key = inputs_key()

    def get(name: str, build, copy_name: str = "ws") -> Path:
        entry = build_cache / f"{name}-{key}"
        with FileLock(str(build_cache / f"{name}.lock")):
            if not entry.is_dir():
                for old in (*build_cache.glob(f"{name}-*"), *build_cache.glob(f".{name}-*")):  # and interrupted builds
                    shutil.rmtree(old, ignore_errors=True)
                building = build_cache / f".{name}-{key}.{os.getpid()}"
                build(building)
                building.rename(entry)
            copy = tmp_path_factory.mktemp(name) / copy_name
            shutil.copytree(entry, copy, symlinks=True)  # under the lock: no other run removes it meanwhile
        return copy

    return get


@pytest.fixture(scope="session")
def sample_records() -> list[dict]:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_model(shared) -> Path:
    from tools.tiny_model import build_tiny_model

    return shared("tiny-model", lambda dest: build_tiny_model(dest, SAMPLE), "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from stages.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model))


def write_params(directory: Path, overrides: dict) -> None:
    from tools.smoke import write_params as write

    write(directory / "params.yaml", overrides)


@pytest.fixture(scope="session")
def smoke_template(shared) -> Path:
    """A smoke workspace (git + DVC, tiny model, smoke params) to copy from, built once."""
    from tools.smoke import make_workspace

    return shared("smoke-workspace", make_workspace)


def no_environment_active() -> dict:
    """This process's environment with no virtual environment active: the README's lines activate it."""
    bin_dir = Path(sys.executable).parent.resolve()
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != bin_dir]
    env = {**os.environ, "PATH": os.pathsep.join(path), "COLUMNS": "120"}  # COLUMNS: a 120-column terminal
    for name in ("VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[Path, str]:
    """`make smoke`, run as the README shows it, in a copy of the project whose .venv is this test
    environment: (the project, make's output). project/smoke holds the pipeline's run, committed on
    main; tests copy it and never change it."""
    from tools.smoke import PROJECT_FILES

    if not (Path(sys.prefix) / "pyvenv.cfg").is_file():
        pytest.skip("the tests run outside a virtual environment (`make test` makes one)")
    project = tmp_path_factory.mktemp("project") / "project"
    project.mkdir()
    for name in (*PROJECT_FILES, "pyproject.toml", "constraints.txt"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, project / name)
    # .venv: this environment, entry by entry, with a marker of its own: `make`'s install step finds
    # it installed and the environment itself is never written to.
    (project / ".venv").mkdir()
    for entry in Path(sys.prefix).iterdir():
        if entry.name != ".installed":
            (project / ".venv" / entry.name).symlink_to(entry)
    (project / ".venv/.installed").touch()
    result = subprocess.run(["make", "smoke"], cwd=project, capture_output=True, text=True, env=no_environment_active())
    assert result.returncode == 0, f"make smoke failed:\n{result.stdout}\n{result.stderr}"
    return project, result.stdout + result.stderr


def private_copy(template: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of template in tmp_path, made the current directory."""
    dest = tmp_path / "ws"
    shutil.copytree(template, dest, symlinks=True)
    monkeypatch.chdir(dest)
    return dest


@pytest.fixture
def workspace(smoke_template, tmp_path, monkeypatch) -> Path:
    """A private copy of the smoke workspace, made the current directory."""
    return private_copy(smoke_template, tmp_path, monkeypatch)


TOKEN_SENTINEL = "hf_SENTINEL_never_written_anywhere_0123456789"


class NetworkGuard:
    """Refuses every outgoing connection and remembers who tried."""

    def __init__(self):
        self.attempts = []

    def __call__(self, sock, address, *args):
        self.attempts.append(address)
        raise ConnectionRefusedError(f"test network guard: connection to {address} refused")


def run_pipeline(template: Path, dest: Path) -> Path:
    """Every stage run once in a copy of template, in this process, with sockets blocked and an HF_TOKEN set
    (plots included). Writes beside the results what the run's process saw: `.network_attempts.json`, the
    connections a stage tried to open, and `.imported.json`, the unsloth modules loaded (both must be empty)."""
    import socket

    shutil.copytree(template, dest, symlinks=True)
    previous = os.getcwd()
    guard = NetworkGuard()
    patcher = pytest.MonkeyPatch()
    patcher.setattr(socket.socket, "connect", guard)
    patcher.setattr(socket.socket, "connect_ex", guard)
    patcher.setenv("HF_TOKEN", TOKEN_SENTINEL)
    os.chdir(dest)
    try:
        from stages import evaluate, evaluate_base, merge, plots, prepare, train, validate

        for stage in (validate, prepare, train, merge, evaluate_base, evaluate):
            stage.main()
        plots.main([])  # PNGs drawn with the sockets blocked: nothing is fetched from a CDN
    finally:
        os.chdir(previous)
        patcher.undo()
    (dest / ".network_attempts.json").write_text(json.dumps([str(a) for a in guard.attempts]))
    (dest / ".imported.json").write_text(json.dumps(sorted(m for m in sys.modules if m.startswith("unsloth"))))
    return dest


@pytest.fixture(scope="session")
def pipeline_run(smoke_template, shared) -> Path:
    """The smoke workspace after every stage ran once (run_pipeline), built once for all test processes.

    Tests only read it. `.network_attempts.json` lists any connection a stage tried to open (the
    offline promise: there must be none).
    """
    return shared("pipeline-run", lambda dest: run_pipeline(smoke_template, dest))


@pytest.fixture(scope="session")
def committed_run(shared, pipeline_run) -> Path:
    """The tiny pipeline's result, recorded by DVC (`dvc commit`) and committed in git: the last good
    result a user would not want to lose."""

    def build(dest):
        from tools.smoke import dvc_environment

        shutil.copytree(pipeline_run, dest, symlinks=True)
        for command in ([sys.executable, "-m", "dvc", "commit", "-f", "-q"], ["git", "add", "-A"],
                        ["git", "commit", "-q", "-m", "the result to keep"]):
            subprocess.run(command, cwd=dest, check=True, capture_output=True, env=dvc_environment())

    return shared("committed-run", build)


@pytest.fixture
def committed_workspace(committed_run, tmp_path, monkeypatch) -> Path:
    """A private copy of committed_run, made the current directory."""
    return private_copy(committed_run, tmp_path, monkeypatch)


def output_hashes(repo: Path) -> dict:
    """Every output dvc.yaml declares, as DVC hashes it (None: missing), and what dvc.lock records of
    every stage but validate (whose success DVC records even when a later stage fails)."""
    from stages.outputs import dvc_md5

    spec = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    outputs = [next(iter(out)) if isinstance(out, dict) else out
               for stage in spec.values() for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])]
    found = {path: dvc_md5(repo / path) if (repo / path).exists() else None for path in outputs}
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))["stages"] if (repo / "dvc.lock").exists() else {}
    return {**found, "dvc.lock": {name: entry for name, entry in lock.items() if name != "validate"}}


PINNED = "_unsloth_is_pinned"  # unsloth_zoo's HOST_PINNED_ATTR


def offload_helpers(pinned=True):
    """A stand-in for unsloth_zoo.gradient_checkpointing (2026.10): its offload slot helpers as it ships them,
    recording the sizes they are asked for (unsloth cannot be imported without a GPU)."""
    import torch

    asked = []

    def mark(buffer, is_pinned):
        setattr(buffer, PINNED, is_pinned)
        return buffer

    def new_host_buffer(numel, dtype):
        asked.append(("new", numel))
        return mark(torch.empty(numel, dtype=dtype), pinned)

    def grow_host_buffer(buffer, new_size):
        asked.append(("grow", new_size))
        if not getattr(buffer, PINNED):  # as unsloth_zoo does: a pageable slot is made anew, by the module's helper
            return module._new_host_buffer(new_size, buffer.dtype)
        return mark(buffer.resize_(new_size), True)

    module = types.SimpleNamespace(HOST_PINNED_ATTR=PINNED, PINNED_MEMORY_AVAILABLE=True,
                                   _pinned_memory_disabled=lambda: False,
                                   _pinned_block_bytes=lambda nbytes: 1 << (int(nbytes) - 1).bit_length(),
                                   _new_host_buffer=new_host_buffer, _grow_host_buffer=grow_host_buffer)
    return module, asked
