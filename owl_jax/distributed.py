"""Start `jax.distributed` for this process, whatever launched it.

Every multi-host run needs `jax.distributed.initialize` before the first JAX call, but the arguments come
from different places: TPU pods (GCE metadata, GKE's `TPU_WORKER_HOSTNAMES`, multi-slice `MEGASCALE_*`)
and SLURM (`SLURM_*`) are detected by jax itself (`jax._src.clusters`), so we only decide *whether* and
*how* to call it; local multi-process CPU runs and Kubernetes GPU JobSets pass an explicit spec through
`OWL_*` environment variables (set by `launch/local.py` and `launch/gke_jobset.py`). A single process
needs nothing, so it gets nothing: the same command line works on a laptop and on a pod.

Environment variables read here (all optional):

- `OWL_DISTRIBUTED`: `auto` (default) or `off` (never initialise, e.g. to debug one host of a pod).
- `OWL_COORDINATOR_ADDRESS` (`host:port`), `OWL_NUM_PROCESSES`, `OWL_PROCESS_ID`: an explicit spec; all
  three or none. `OWL_LOCAL_DEVICE_IDS` (`0,1,2`) restricts this process's devices.
- `OWL_CLUSTER`: force one of jax's cluster detection methods (`slurm`, `gcetpu`, `gketpu`, `ompi`,
  `mpi4py`, `k8s`) instead of detecting.
- `OWL_INIT_TIMEOUT` (s, default 300): how long to wait for all processes to join before failing.
- `OWL_HEARTBEAT_TIMEOUT` (s, default 100): after this long without a peer's heartbeat the others stop
  with an error instead of hanging in a collective.
- `OWL_SHUTDOWN_TIMEOUT` (s, default 300): how long an exiting process waits at jax's shutdown barrier for
  the others. A process that fails with a Python exception waits here while its peers block in their next
  collective, so this bounds how long a failed run takes to end (then jax aborts every process).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from owl_jax.config import ConfigError

log = logging.getLogger("owl_jax.distributed")

EXPLICIT_KEYS = ("OWL_COORDINATOR_ADDRESS", "OWL_NUM_PROCESSES", "OWL_PROCESS_ID")
# jax.distributed's own detection names (jax._src.clusters.*.name).
CLUSTER_METHODS = ("slurm", "gcetpu", "gketpu", "ompi", "mpi4py", "k8s")
_SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OFF = ("0", "off", "false", "no", "none")
# (DistributedSpec field, environment variable, default = jax's default)
_TIMEOUTS = (("initialization_timeout", "OWL_INIT_TIMEOUT", 300),
             ("heartbeat_timeout_seconds", "OWL_HEARTBEAT_TIMEOUT", 100),
             ("shutdown_timeout_seconds", "OWL_SHUTDOWN_TIMEOUT", 300))


class DistributedError(ConfigError):
    """The multi-process spec is incomplete or wrong, or the processes could not meet in time.

    A ConfigError so that the train CLI reports it like any other bad setting (exit status 2)."""


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """The keyword arguments for `jax.distributed.initialize`, plus where they came from (for the log).

    `None` fields are left for jax's cluster detection (`cluster_detection_method`) to fill in."""

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cluster_detection_method: str | None = None
    initialization_timeout: int = 300
    heartbeat_timeout_seconds: int = 100
    shutdown_timeout_seconds: int = 300

    def kwargs(self) -> dict[str, Any]:
        """Exactly what is passed to `jax.distributed.initialize`."""
        out: dict[str, Any] = {
            "initialization_timeout": self.initialization_timeout,
            "heartbeat_timeout_seconds": self.heartbeat_timeout_seconds,
            "shutdown_timeout_seconds": self.shutdown_timeout_seconds,
        }
        for name in ("coordinator_address", "num_processes", "process_id", "cluster_detection_method"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.local_device_ids is not None:
            out["local_device_ids"] = list(self.local_device_ids)
        return out


def _int(env: Mapping[str, str], key: str, *, minimum: int) -> int:
    raw = env[key]
    try:
        value = int(raw)
    except ValueError:
        raise DistributedError(f"{key}={raw!r} is not an integer") from None
    if value < minimum:
        raise DistributedError(f"{key}={value} must be >= {minimum}")
    return value


def _device_ids(env: Mapping[str, str]) -> tuple[int, ...] | None:
    raw = env.get("OWL_LOCAL_DEVICE_IDS", "").strip()
    if not raw:
        return None
    try:
        return tuple(int(x) for x in raw.split(","))
    except ValueError:
        raise DistributedError(f"OWL_LOCAL_DEVICE_IDS={raw!r} is not a comma-separated list of integers") from None


def _explicit(env: Mapping[str, str], timeouts: dict[str, int]) -> DistributedSpec:
    missing = [k for k in EXPLICIT_KEYS if not env.get(k, "").strip()]
    if missing:
        given = [k for k in EXPLICIT_KEYS if k not in missing]
        raise DistributedError(f"incomplete multi-process spec: {', '.join(given)} set but {', '.join(missing)} "
                               f"missing; set all of {', '.join(EXPLICIT_KEYS)} (or none for auto-detection)")
    address = env["OWL_COORDINATOR_ADDRESS"].strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"OWL_COORDINATOR_ADDRESS={address!r} must be host:port, e.g. 127.0.0.1:12355")
    num = _int(env, "OWL_NUM_PROCESSES", minimum=1)
    pid = _int(env, "OWL_PROCESS_ID", minimum=0)
    if pid >= num:
        raise DistributedError(f"OWL_PROCESS_ID={pid} must be < OWL_NUM_PROCESSES={num}")
    # "deactivate": with an explicit spec jax must not also consult SLURM/TPU/k8s detection (it would,
    # e.g., pin one GPU per process inside a SLURM allocation).
    return DistributedSpec("explicit", address, num, pid, _device_ids(env), "deactivate", **timeouts)


def on_tpu_vm() -> bool:
    """True on a Cloud TPU VM / GKE TPU node: jax's own test (libtpu installed and TPU chips on the PCI
    bus), made when jax is imported; importing jax does not start a backend."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # private module moved: fall back to the device nodes TPU VMs have
        return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def _several(hosts: str | None) -> bool:
    """A comma-separated host list naming more than one host (a single-host TPU, or a tool describing
    one, sets TPU_WORKER_HOSTNAMES=localhost: one process, nothing to join)."""
    return bool(hosts) and len([h for h in hosts.split(",") if h.strip()]) > 1


def resolve(env: Mapping[str, str], *, tpu_vm: Callable[[], bool] = on_tpu_vm) -> DistributedSpec | None:
    """Decide from the environment how (and whether) to call `jax.distributed.initialize`.

    Order: `OWL_DISTRIBUTED=off`, then an explicit `OWL_*` spec, then a forced `OWL_CLUSTER`, then
    SLURM with more than one task, then a multi-host TPU (GKE env / multi-slice env / TPU VM).
    Returns None for a single process. Pure apart from `tpu_vm`, so it is unit-testable."""
    mode = env.get("OWL_DISTRIBUTED", "auto").strip().lower()
    if mode in _OFF:
        return None
    if mode not in ("auto", "1", "on", "true", "yes"):
        raise DistributedError(f"OWL_DISTRIBUTED={mode!r}: expected auto or off")
    timeouts = {name: _int(env, key, minimum=1) if key in env else default
                for name, key, default in _TIMEOUTS}
    if any(env.get(k, "").strip() for k in EXPLICIT_KEYS):
        return _explicit(env, timeouts)
    forced = env.get("OWL_CLUSTER", "").strip().lower()
    if forced:
        if forced not in CLUSTER_METHODS:
            raise DistributedError(f"OWL_CLUSTER={forced!r}: expected one of {', '.join(CLUSTER_METHODS)}")
        return DistributedSpec(forced, local_device_ids=_device_ids(env), cluster_detection_method=forced,
                               **timeouts)
    if all(k in env for k in _SLURM_KEYS):
        # jax parses SLURM_STEP_NODELIST (first node = coordinator) and the port from SLURM_JOB_ID.
        if _int(env, "SLURM_NTASKS", minimum=1) > 1:
            return DistributedSpec("slurm", local_device_ids=_device_ids(env), cluster_detection_method="slurm",
                                   **timeouts)
        return None
    if _several(env.get("TPU_WORKER_HOSTNAMES")) or _several(env.get("TPU_PROCESS_ADDRESSES")) \
            or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return DistributedSpec("gketpu" if env.get("KUBERNETES_SERVICE_HOST") else "tpu", **timeouts)
    if tpu_vm():
        # GCE TPU VM: jax reads the worker list from the metadata server (one host -> one process, harmless).
        return DistributedSpec("tpu", **timeouts)
    return None


def initialize(env: Mapping[str, str] | None = None, *,
               init_fn: Callable[..., Any] | None = None,
               tpu_vm: Callable[[], bool] = on_tpu_vm) -> DistributedSpec | None:
    """Initialise `jax.distributed` if this process is one of several; must run before any JAX call.

    `env` defaults to `os.environ`; `init_fn` defaults to `jax.distributed.initialize` (tests inject a
    recorder). Returns the spec used, or None for a single process. Raises DistributedError for an
    incomplete spec or when the processes did not all join within `OWL_INIT_TIMEOUT`."""
    spec = resolve(os.environ if env is None else env, tpu_vm=tpu_vm)
    if spec is None:
        return None
    if init_fn is None:
        import jax
        if jax.distributed.is_initialized():
            return spec
        init_fn = jax.distributed.initialize
    log.info("jax.distributed.initialize via %s: %s", spec.source, spec.kwargs())
    try:
        init_fn(**spec.kwargs())
    except (RuntimeError, ValueError) as e:  # jax raises these for timeouts / undetectable clusters
        where = spec.coordinator_address or f"the {spec.source} coordinator"
        raise DistributedError(f"jax.distributed.initialize ({spec.source}) failed: {e}. Check that all "
                               f"{spec.num_processes or 'the'} processes were started and can reach {where} "
                               f"(waited up to {spec.initialization_timeout}s, OWL_INIT_TIMEOUT)") from e
    return spec


def describe(spec: DistributedSpec | None, process_index: int, process_count: int) -> str:
    """One line for the run log: how the processes met."""
    if spec is None:
        return "single process"
    return f"process {process_index}/{process_count} (jax.distributed via {spec.source})"


__all__: Sequence[str] = ("DistributedError", "DistributedSpec", "describe", "initialize", "on_tpu_vm", "resolve")
