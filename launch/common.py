"""What every launcher shares: the train command line, shell quoting, and "print or run".

Launchers build plain data (argv lists, a shell script, a YAML document) first and only then either print
it (`--dry-run`) or execute it, so the dry-run output is exactly what would run and tests can compare it."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence


def train_argv(train_args: Sequence[str], *, python: str = "python", module: str = "owl_jax.train") -> list[str]:
    """`python -m owl_jax.train --config ... section.key=value ...` as an argv list."""
    args = list(train_args)
    if args and args[0] == "--":
        args = args[1:]
    if module == "owl_jax.train" and "--config" not in args and not any(a.startswith("--config=") for a in args):
        raise SystemExit("error: pass the train arguments after `--`, e.g. -- --config configs/tiny.yaml")
    return [python, "-m", module, *args]


def env_prefix(env: Mapping[str, str]) -> str:
    """`K=V K2='v 2' ` to put in front of a shell command (keys in the given order)."""
    return "".join(f"{k}={shlex.quote(str(v))} " for k, v in env.items())


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="after `--`: the train CLI's arguments (--config ... section.key=value ...)")


def run_script(script: str) -> int:
    """Run a generated bash script (the same text --dry-run prints)."""
    return subprocess.call(["bash", "-c", script])


def emit(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
