"""Shared fixtures: a tiny Llama-shaped model, a smoke workspace and a `make smoke` run, built once per
session; a stand-in for unsloth_zoo's offload helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data/sample/pubmedqa_ko_sample.json"

# Tests never reach the Hugging Face Hub: everything they load is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def sample_records() -> list[dict]:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tools.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", SAMPLE)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from stages.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model))


def write_params(directory: Path, overrides: dict) -> None:
    from tools.smoke import write_params as write

    write(directory / "params.yaml", overrides)


@pytest.fixture(scope="session")
def smoke_template(tmp_path_factory) -> Path:
    """A smoke workspace (git + DVC, tiny model, smoke params) to copy from, built once."""
    from tools.smoke import make_workspace

    return make_workspace(tmp_path_factory.mktemp("template") / "ws")


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


@pytest.fixture
def workspace(smoke_template, tmp_path, monkeypatch) -> Path:
    """A private copy of the smoke workspace, made the current directory."""
    dest = tmp_path / "ws"
    shutil.copytree(smoke_template, dest, symlinks=True)
    monkeypatch.chdir(dest)
    return dest


TOKEN_SENTINEL = "hf_SENTINEL_never_written_anywhere_0123456789"


class NetworkGuard:
    """Refuses every outgoing connection and remembers who tried."""

    def __init__(self):
        self.attempts = []

    def __call__(self, sock, address, *args):
        self.attempts.append(address)
        raise ConnectionRefusedError(f"test network guard: connection to {address} refused")


@pytest.fixture(scope="session")
def pipeline_run(smoke_template, tmp_path_factory) -> Path:
    """Every stage run once, in-process, with sockets blocked and an HF_TOKEN set (plots included).

    Tests then only read the workspace. `pipeline_run.network_attempts` lists any connection a
    stage tried to open (the offline promise: there must be none).
    """
    import socket

    dest = tmp_path_factory.mktemp("pipeline") / "ws"
    shutil.copytree(smoke_template, dest, symlinks=True)
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
    return dest


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
