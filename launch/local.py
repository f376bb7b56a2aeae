"""Run N processes of the train CLI on this machine, each with M fake CPU devices, as one JAX cluster.

This is how multi-host code paths (data sharding across processes, global batch assembly, checkpoints
written by several processes, resume on another process count) are exercised without a pod:
`jax.distributed` joins the processes through a coordinator on localhost (gloo collectives on CPU).

    python launch/local.py --processes 2 --devices 4 --log-dir runs/mp/logs -- --config configs/tiny.yaml

Each process logs to `<log-dir>/process_<i>.log`. When one process fails the others are terminated (a
dead peer would otherwise leave them waiting in a collective until the heartbeat timeout) and the
launcher exits with the failed process's status.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python launch/local.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import add_train_args, emit, env_prefix, train_argv  # noqa: E402


@dataclasses.dataclass(frozen=True)
class ProcessPlan:
    """One process to start: its extra environment, argv and log file."""

    index: int
    env: dict[str, str]
    argv: list[str]
    log: str

    def shell(self) -> str:
        return f"{env_prefix(self.env)}{shlex.join(self.argv)} > {shlex.quote(self.log)} 2>&1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _xla_flags(existing: str, devices: int) -> str:
    kept = [f for f in existing.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def plan(processes: int, devices: int, port: int, log_dir: str, train_args: Sequence[str], *,
         base_env: Mapping[str, str] | None = None, init_timeout: int = 120, heartbeat_timeout: int = 30, shutdown_timeout: int = 30,
         python: str = "python", module: str = "owl_jax.train") -> list[ProcessPlan]:
    """The processes to start (pure: no ports opened, nothing run)."""
    if processes < 1 or devices < 1:
        raise ValueError("--processes and --devices must be >= 1")
    base = os.environ if base_env is None else base_env
    argv = train_argv(train_args, python=python, module=module)
    out = []
    for i in range(processes):
        env = {"JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": _xla_flags(base.get("XLA_FLAGS", ""), devices),
               "OWL_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "OWL_NUM_PROCESSES": str(processes),
               "OWL_PROCESS_ID": str(i),
               "OWL_INIT_TIMEOUT": str(init_timeout),
               "OWL_HEARTBEAT_TIMEOUT": str(heartbeat_timeout),
               "OWL_SHUTDOWN_TIMEOUT": str(shutdown_timeout)}
        out.append(ProcessPlan(i, env, list(argv), os.path.join(log_dir, f"process_{i}.log")))
    return out


def dry_run_text(plans: Sequence[ProcessPlan]) -> str:
    return "\n".join(p.shell() for p in plans) + "\n"


def run(plans: Sequence[ProcessPlan], *, grace_s: float = 10.0, poll_s: float = 0.2) -> int:
    """Start every process, wait; if one fails, stop the rest. Returns the first failure's status (or 0)."""
    procs: list[tuple[ProcessPlan, subprocess.Popen]] = []
    try:
        for p in plans:
            Path(p.log).parent.mkdir(parents=True, exist_ok=True)
            with open(p.log, "wb") as log:
                procs.append((p, subprocess.Popen(p.argv, env={**os.environ, **p.env}, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True)))
        while True:
            codes = [proc.poll() for _, proc in procs]
            failed = [(p, c) for (p, _), c in zip(procs, codes) if c not in (None, 0)]
            if failed:
                p, code = failed[0]
                print(f"launch/local.py: process {p.index} exited with status {code} (log: {p.log}); "
                      f"stopping the others", file=sys.stderr)
                _stop([proc for _, proc in procs], grace_s)
                return code if code > 0 else 128 - code  # killed by signal N -> 128+N, like a shell
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _stop([proc for _, proc in procs], grace_s)
        return 130


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM (the train CLI checkpoints on it), then SIGKILL after `grace_s`; only our own children."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/local.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="fake CPU devices per process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--log-dir", default="runs/local_logs")
    parser.add_argument("--init-timeout", type=int, default=120, help="s for all processes to join")
    parser.add_argument("--heartbeat-timeout", type=int, default=30, help="s before a silent peer is dead")
    parser.add_argument("--shutdown-timeout", type=int, default=30,
                        help="s an exiting process waits for the others (bounds how long a failed run lingers)")
    parser.add_argument("--python", default=sys.executable, help="interpreter on this machine")
    parser.add_argument("--module", default="owl_jax.train")
    add_train_args(parser)
    args = parser.parse_args(argv)
    port = args.port or free_port()
    plans = plan(args.processes, args.devices, port, args.log_dir, args.train_args,
                 init_timeout=args.init_timeout, heartbeat_timeout=args.heartbeat_timeout,
                 shutdown_timeout=args.shutdown_timeout,
                 python=args.python, module=args.module)
    if args.dry_run:
        emit(dry_run_text(plans))
        return 0
    return run(plans)


if __name__ == "__main__":
    sys.exit(main())
