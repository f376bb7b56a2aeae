"""Run the train CLI on every worker of a Cloud TPU VM pod (or of several slices) through `gcloud`.

A pod slice is N hosts that must all run the same program at once; `gcloud compute tpus tpu-vm ssh NAME
--worker=all --command ...` does that. Before the run, every worker gets the same code: a git checkout at
a fixed ref (`--git-url/--ref`, installed editable into a venv) or a wheel built here (`--wheel`, copied
with `configs/`). Each worker writes its own log (`<log-dir>/slice<S>-worker<W>.log`, W from the TPU
metadata server), since interleaved output of 64 hosts is unreadable. `jax.distributed` needs no
arguments on a TPU VM (owl_jax.distributed leaves detection to jax).

Multi-slice (`--num-slices K`): K TPU VMs named `NAME-0 .. NAME-(K-1)` (what
`gcloud compute tpus queued-resources create --node-prefix NAME --node-count K` creates, see `--create`)
run together over DCN; each slice gets `MEGASCALE_COORDINATOR_ADDRESS` (worker 0 of slice 0),
`MEGASCALE_NUM_SLICES`, `MEGASCALE_SLICE_ID` and `MEGASCALE_PORT`.

    python launch/tpu_pod.py --name owl-v5e --zone us-west4-a --git-url https://github.com/me/owl-jax \\
        --ref v0.1.0 --dry-run -- --config configs/stage1.yaml training.output_dir=gs://b/run1
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python launch/tpu_pod.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import add_train_args, emit, env_prefix, run_script, train_argv  # noqa: E402

METADATA_WORKER = ("curl -sf -H 'Metadata-Flavor: Google' "
                   "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number")
MEGASCALE_PORT = 8080
_COORD = "@@COORDINATOR@@"


@dataclasses.dataclass(frozen=True)
class PodSpec:
    """Where to run and how to install; paths are relative to each worker's home directory."""

    name: str
    zone: str
    project: str | None = None
    num_slices: int = 1
    git_url: str | None = None
    ref: str | None = None
    wheel: str | None = None
    workdir: str = "owl-jax"
    venv: str = "owl-venv"
    log_dir: str = "owl-logs"
    extras: str = "tpu"
    env: tuple[tuple[str, str], ...] = ()
    accelerator_type: str | None = None
    runtime_version: str | None = None

    def nodes(self) -> list[str]:
        return [self.name] if self.num_slices == 1 else [f"{self.name}-{i}" for i in range(self.num_slices)]

    def gcloud_where(self) -> list[str]:
        return ["--zone", self.zone, *(["--project", self.project] if self.project else [])]


def ssh(spec: PodSpec, node: str, remote: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *spec.gcloud_where(), "--worker=all",
            "--command", remote]


def create_commands(spec: PodSpec) -> list[list[str]]:
    """Create the TPU VM (one slice) or a queued resource of `num_slices` nodes."""
    if not (spec.accelerator_type and spec.runtime_version):
        raise SystemExit("error: --create needs --accelerator-type and --runtime-version")
    if spec.num_slices == 1:
        return [["gcloud", "compute", "tpus", "tpu-vm", "create", spec.name, *spec.gcloud_where(),
                 "--accelerator-type", spec.accelerator_type, "--version", spec.runtime_version]]
    return [["gcloud", "compute", "tpus", "queued-resources", "create", spec.name, *spec.gcloud_where(),
             "--accelerator-type", spec.accelerator_type, "--runtime-version", spec.runtime_version,
             "--node-count", str(spec.num_slices), "--node-prefix", spec.name]]


def setup_commands(spec: PodSpec) -> list[list[str]]:
    """Same code and venv on every worker of every slice."""
    q = shlex.quote
    venv_pip = f"{q(spec.venv)}/bin/pip"
    if spec.wheel:
        wheel = Path(spec.wheel).name
        remote = (f"set -e; python3 -m venv {q(spec.venv)}; {venv_pip} install -q --upgrade pip; "
                  f"{venv_pip} install -q {q(f'{spec.workdir}/{wheel}[{spec.extras}]')}")
        cmds = []
        for node in spec.nodes():
            cmds.append(ssh(spec, node, f"mkdir -p {q(spec.workdir)}"))
            cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", spec.wheel, "configs",
                         f"{node}:{spec.workdir}/", *spec.gcloud_where(), "--worker=all"])
            cmds.append(ssh(spec, node, remote))
        return cmds
    if not (spec.git_url and spec.ref):
        raise SystemExit("error: give --git-url and --ref (a tag or commit every worker checks out) or --wheel")
    remote = (f"set -e; [ -d {q(spec.workdir)}/.git ] || git clone -q {q(spec.git_url)} {q(spec.workdir)}; "
              f"cd {q(spec.workdir)}; git fetch -q origin {q(spec.ref)}; git checkout -q --detach FETCH_HEAD; "
              f"cd; python3 -m venv {q(spec.venv)}; {venv_pip} install -q --upgrade pip; "
              f"{venv_pip} install -q -e {q(f'{spec.workdir}[{spec.extras}]')}")
    return [ssh(spec, node, remote) for node in spec.nodes()]


def remote_run(spec: PodSpec, slice_id: int, train_args: Sequence[str]) -> str:
    """The command each worker of slice `slice_id` runs (from its home directory)."""
    q = shlex.quote
    env = dict(spec.env)
    if spec.num_slices > 1:
        env = {"MEGASCALE_COORDINATOR_ADDRESS": f"{_COORD}:{MEGASCALE_PORT}",
               "MEGASCALE_NUM_SLICES": str(spec.num_slices), "MEGASCALE_SLICE_ID": str(slice_id),
               "MEGASCALE_PORT": str(MEGASCALE_PORT), **env}
    argv = train_argv(train_args, python=f"$HOME/{spec.venv}/bin/python")
    log = f"$HOME/{q(spec.log_dir)}/slice{slice_id}-worker$W.log"
    # $HOME and $W stay unquoted (expanded on the worker); everything user-given is quoted.
    cmd = " ".join(a if a.startswith("$HOME/") else q(a) for a in argv)
    return (f"mkdir -p $HOME/{q(spec.log_dir)} && W=$({METADATA_WORKER} || hostname) && cd {q(spec.workdir)} && "
            f"{env_prefix(env)}{cmd} > {log} 2>&1")


def script(spec: PodSpec, train_args: Sequence[str], *, create: bool = False, setup: bool = True) -> str:
    """The whole launch as a bash script: what --dry-run prints and what runs otherwise."""
    lines = ["#!/bin/bash", "set -euo pipefail"]
    if create:
        lines += [shlex.join(c) for c in create_commands(spec)]
        if spec.num_slices > 1:  # queued resources are provisioned asynchronously
            state = ["gcloud", "compute", "tpus", "queued-resources", "describe", spec.name, *spec.gcloud_where(),
                     "--format=value(state.state)"]
            lines.append(f'until [ "$({shlex.join(state)})" = ACTIVE ]; do sleep 30; done')
    if setup:
        lines += [shlex.join(c) for c in setup_commands(spec)]
    if spec.num_slices == 1:
        lines.append(shlex.join(ssh(spec, spec.name, remote_run(spec, 0, train_args))))
        return "\n".join(lines) + "\n"
    describe = ["gcloud", "compute", "tpus", "tpu-vm", "describe", spec.nodes()[0], *spec.gcloud_where(),
                "--format=value(networkEndpoints[0].ipAddress)"]
    lines.append(f"COORDINATOR=$({shlex.join(describe)})")
    lines.append("pids=()")
    for i, node in enumerate(spec.nodes()):
        # The coordinator IP is only known when the script runs: splice "$COORDINATOR" into the quoting.
        line = shlex.join(ssh(spec, node, remote_run(spec, i, train_args))).replace(_COORD, "'\"$COORDINATOR\"'")
        lines.append(f"{line} &")
        lines.append("pids+=($!)")
    lines.append('rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc')
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/tpu_pod.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="TPU VM name (multi-slice: node prefix)")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project")
    parser.add_argument("--num-slices", type=int, default=1)
    parser.add_argument("--git-url", help="repository every worker clones")
    parser.add_argument("--ref", help="tag or commit to check out on every worker")
    parser.add_argument("--wheel", help="a wheel built here (python -m build --wheel), copied to every worker")
    parser.add_argument("--workdir", default="owl-jax", help="on each worker, relative to $HOME")
    parser.add_argument("--venv", default="owl-venv", help="on each worker, relative to $HOME")
    parser.add_argument("--log-dir", default="owl-logs", help="on each worker, relative to $HOME")
    parser.add_argument("--extras", default="tpu")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra env on every worker")
    parser.add_argument("--skip-setup", action="store_true", help="workers are already set up")
    parser.add_argument("--create", action="store_true", help="create the TPU VM / queued resource first")
    parser.add_argument("--accelerator-type", help="for --create, e.g. v5litepod-16")
    parser.add_argument("--runtime-version", help="for --create, e.g. v2-alpha-tpuv5-lite")
    add_train_args(parser)
    args = parser.parse_args(argv)
    if args.num_slices < 1:
        parser.error("--num-slices must be >= 1")
    bad = [e for e in args.env if "=" not in e]
    if bad:
        parser.error(f"--env expects KEY=VALUE, got {bad}")
    spec = PodSpec(args.name, args.zone, args.project, args.num_slices, args.git_url, args.ref, args.wheel,
                   args.workdir, args.venv, args.log_dir, args.extras,
                   tuple(tuple(e.split("=", 1)) for e in args.env), args.accelerator_type, args.runtime_version)
    text = script(spec, args.train_args, create=args.create, setup=not args.skip_setup)
    if args.dry_run:
        emit(text)
        return 0
    return run_script(text)


if __name__ == "__main__":
    sys.exit(main())
