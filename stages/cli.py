"""The command line of every `python -m stages.<name>` and `python -m tools.<name>`.

`--help` prints the module's docstring (the command, what it reads and writes) and, for a stage
of dvc.yaml, the files and params dvc.yaml gives it, then the options, and exits 0 before
anything runs. A wrong argument is one line and exit 2, like every other user error here.

    args = parser(__spec__.name, __doc__).parse_args(argv)   # an entry point with options
    no_arguments(__spec__.name, __doc__)                     # one without, in its __main__ block
"""

from __future__ import annotations

import argparse
import textwrap

from stages import paths


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own prints the usage too: two or more lines
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _names(entries) -> list[str]:
    """dvc.yaml's deps / outs / params entries: a name, or {name: options}."""
    return [name for entry in entries or [] for name in (entry if isinstance(entry, dict) else [entry])]


def dvc_stage_summary(module: str) -> str | None:
    """What dvc.yaml says the stage run as `python -m <module>` reads and writes, or None."""
    if not paths.DVC_YAML.exists():
        return None
    import yaml

    stages = (yaml.safe_load(paths.DVC_YAML.read_text(encoding="utf-8")) or {}).get("stages", {})
    for name, stage in stages.items():
        if stage.get("cmd") == f"python -m {module}":
            deps = _names(stage.get("deps"))
            params = [f"all of {p}" if p == paths.PARAMS_FILE.as_posix() else p for p in _names(stage.get("params"))]
            lines = {"reads": [d for d in deps if not d.endswith(".py")], "params": params,
                     "writes": _names(stage.get("outs")) + _names(stage.get("metrics")) + _names(stage.get("plots")),
                     "code": [d for d in deps if d.endswith(".py")]}
            return f"as dvc.yaml runs it (`dvc repro {name}`):\n" + "\n".join(
                textwrap.fill(", ".join(names) or "nothing", 100, initial_indent=f"  {what + ':':8}",
                              subsequent_indent=" " * 10, break_on_hyphens=False, break_long_words=False)
                for what, names in lines.items())
    return None


def parser(module: str, doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help is the module's docstring and dvc.yaml's view of it."""
    return _OneLineParser(prog=f"python -m {module}", description=doc.strip(), epilog=dvc_stage_summary(module),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def no_arguments(module: str, doc: str, argv: list[str] | None = None) -> None:
    """For an entry point without options: --help, or one line and exit 2 for any argument."""
    parser(module, doc).parse_args(argv)
