"""Generate (and submit) an sbatch script that runs the train CLI on a SLURM GPU cluster.

`srun` starts the processes; jax's SLURM detection (used by owl_jax.distributed) takes the coordinator
from the first node of `SLURM_STEP_NODELIST`, the port from the job id (or `JAX_COORDINATOR_PORT`), and the
process count/id from `SLURM_NTASKS`/`SLURM_PROCID`. Two layouts:

- `--tasks per-gpu` (default, jax's SLURM default): one process per GPU, each sees its GPU
  (`SLURM_LOCALID`).
- `--tasks per-node`: one process per node that drives all its GPUs; the script sets
  `OWL_LOCAL_DEVICE_IDS=0,..,G-1` because jax would otherwise pin the process to GPU `SLURM_LOCALID`=0.

Each task logs to `<log-dir>/%x-%j-task%t.log`; `--kill-on-bad-exit=1` ends the step when one task fails.
Give `--log-dir` and `--workdir` as absolute paths on the shared filesystem: `#SBATCH --output` is
resolved from the submission directory, srun's from `--workdir`.

    python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 12:00:00 --dry-run \\
        -- --config configs/stage1.yaml training.output_dir=/shared/runs/s1
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python launch/slurm.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import add_train_args, emit, train_argv  # noqa: E402


@dataclasses.dataclass(frozen=True)
class SlurmSpec:
    job_name: str = "owl-jax"
    nodes: int = 1
    gpus_per_node: int = 8
    tasks: str = "per-gpu"
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    log_dir: str = "slurm-logs"
    workdir: str | None = None
    venv: str | None = None
    port: int | None = None
    init_timeout: int = 600
    heartbeat_timeout: int = 100
    env: tuple[tuple[str, str], ...] = ()

    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.tasks == "per-gpu" else 1


def sbatch_script(spec: SlurmSpec, train_args: Sequence[str]) -> str:
    """The sbatch file's text."""
    if spec.tasks not in ("per-gpu", "per-node"):
        raise ValueError(f"tasks must be per-gpu or per-node, not {spec.tasks!r}")
    q = shlex.quote
    directives = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}",
                  f"--ntasks-per-node={spec.tasks_per_node()}", f"--gpus-per-node={spec.gpus_per_node}",
                  "--exclusive", f"--output={spec.log_dir}/%x-%j.out"]
    directives += [f"--{k}={v}" for k, v in (("partition", spec.partition), ("account", spec.account),
                                              ("time", spec.time), ("cpus-per-task", spec.cpus_per_task)) if v]
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "set -euo pipefail"]
    if spec.workdir:
        lines.append(f"cd {q(spec.workdir)}")
    if spec.venv:
        lines.append(f"source {q(spec.venv)}/bin/activate")
    env = {"OWL_INIT_TIMEOUT": str(spec.init_timeout), "OWL_HEARTBEAT_TIMEOUT": str(spec.heartbeat_timeout)}
    if spec.port:
        env["JAX_COORDINATOR_PORT"] = str(spec.port)
    if spec.tasks == "per-node":
        env["OWL_LOCAL_DEVICE_IDS"] = ",".join(str(i) for i in range(spec.gpus_per_node))
    env.update(dict(spec.env))
    lines += [f"export {k}={q(v)}" for k, v in env.items()]
    lines.append(f"mkdir -p {q(spec.log_dir)}")
    srun = ["srun", "--kill-on-bad-exit=1", f"--output={spec.log_dir}/%x-%j-task%t.log",
            *train_argv(train_args)]
    lines.append(shlex.join(srun))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/slurm.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-name", default="owl-jax")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tasks", choices=("per-gpu", "per-node"), default="per-gpu")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--time", help="e.g. 12:00:00")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--log-dir", default="slurm-logs")
    parser.add_argument("--workdir", help="repository checkout on the shared filesystem")
    parser.add_argument("--venv", help="virtualenv to activate (on the shared filesystem)")
    parser.add_argument("--port", type=int, help="coordinator port (default: derived from the job id by jax)")
    parser.add_argument("--init-timeout", type=int, default=600)
    parser.add_argument("--heartbeat-timeout", type=int, default=100)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", help="sbatch file to write (default <job-name>.sbatch)")
    add_train_args(parser)
    args = parser.parse_args(argv)
    bad = [e for e in args.env if "=" not in e]
    if bad:
        parser.error(f"--env expects KEY=VALUE, got {bad}")
    spec = SlurmSpec(args.job_name, args.nodes, args.gpus_per_node, args.tasks, args.partition, args.account,
                     args.time, args.cpus_per_task, args.log_dir, args.workdir, args.venv, args.port,
                     args.init_timeout, args.heartbeat_timeout, tuple(tuple(e.split("=", 1)) for e in args.env))
    text = sbatch_script(spec, args.train_args)
    output = args.output or f"{args.job_name}.sbatch"
    submit = ["sbatch", output]
    if args.dry_run:
        emit(f"# {output}\n{text}# then: {shlex.join(submit)}")
        return 0
    Path(output).write_text(text)
    Path(spec.log_dir).mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output directory
    return subprocess.call(submit)


if __name__ == "__main__":
    sys.exit(main())
