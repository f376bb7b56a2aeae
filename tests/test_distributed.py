"""owl_jax.distributed: environment -> the arguments jax.distributed.initialize would receive (no JAX runtime)."""

import pytest

from owl_jax.config import ConfigError
from owl_jax.distributed import DistributedError, initialize, resolve

NO_TPU = lambda: False  # noqa: E731

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[017-020]", "SLURM_NTASKS": "32",
         "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}


def calls_for(env, tpu_vm=NO_TPU):
    calls = []
    spec = initialize(env, init_fn=lambda **kw: calls.append(kw), tpu_vm=tpu_vm)
    return spec, calls


def test_single_process_is_a_noop():
    spec, calls = calls_for({"HOME": "/root"})
    assert spec is None and calls == []


def test_explicit_spec_local_cpu():
    spec, calls = calls_for({"OWL_COORDINATOR_ADDRESS": "127.0.0.1:12355", "OWL_NUM_PROCESSES": "2",
                             "OWL_PROCESS_ID": "1", "OWL_INIT_TIMEOUT": "30", "OWL_HEARTBEAT_TIMEOUT": "10",
                             "OWL_SHUTDOWN_TIMEOUT": "20"})
    assert spec.source == "explicit"
    assert calls == [{"coordinator_address": "127.0.0.1:12355", "num_processes": 2, "process_id": 1,
                      "cluster_detection_method": "deactivate", "initialization_timeout": 30,
                      "heartbeat_timeout_seconds": 10, "shutdown_timeout_seconds": 20}]


def test_explicit_spec_wins_over_slurm_and_takes_device_ids():
    env = dict(SLURM, OWL_COORDINATOR_ADDRESS="node1:9999", OWL_NUM_PROCESSES="4", OWL_PROCESS_ID="0",
               OWL_LOCAL_DEVICE_IDS="0,1,2,3")
    assert resolve(env, tpu_vm=NO_TPU).kwargs() == {
        "coordinator_address": "node1:9999", "num_processes": 4, "process_id": 0,
        "cluster_detection_method": "deactivate", "local_device_ids": [0, 1, 2, 3],
        "initialization_timeout": 300, "heartbeat_timeout_seconds": 100, "shutdown_timeout_seconds": 300}


@pytest.mark.parametrize("env, message", [
    ({"OWL_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, "OWL_NUM_PROCESSES, OWL_PROCESS_ID missing"),
    ({"OWL_NUM_PROCESSES": "2", "OWL_PROCESS_ID": "0"}, "OWL_COORDINATOR_ADDRESS missing"),
    ({"OWL_COORDINATOR_ADDRESS": "127.0.0.1", "OWL_NUM_PROCESSES": "2", "OWL_PROCESS_ID": "0"}, "host:port"),
    ({"OWL_COORDINATOR_ADDRESS": "h:1", "OWL_NUM_PROCESSES": "two", "OWL_PROCESS_ID": "0"}, "not an integer"),
    ({"OWL_COORDINATOR_ADDRESS": "h:1", "OWL_NUM_PROCESSES": "2", "OWL_PROCESS_ID": "2"}, "must be < OWL_NUM"),
    ({"OWL_COORDINATOR_ADDRESS": "h:1", "OWL_NUM_PROCESSES": "2", "OWL_PROCESS_ID": "0",
      "OWL_INIT_TIMEOUT": "0"}, "OWL_INIT_TIMEOUT=0 must be >= 1"),
    ({"OWL_CLUSTER": "lsf"}, "expected one of"),
    ({"OWL_DISTRIBUTED": "maybe"}, "expected auto or off"),
])
def test_bad_specs_are_clear_config_errors(env, message):
    with pytest.raises(DistributedError, match=message) as info:
        calls_for(env)
    assert isinstance(info.value, ConfigError)  # the train CLI reports it as a config error (exit 2)


def test_slurm_delegates_nodelist_parsing_to_jax():
    spec, calls = calls_for(SLURM)
    assert spec.source == "slurm"
    assert calls == [{"cluster_detection_method": "slurm", "initialization_timeout": 300,
                      "heartbeat_timeout_seconds": 100, "shutdown_timeout_seconds": 300}]
    # one task per node: every GPU of the node stays visible
    assert resolve(dict(SLURM, OWL_LOCAL_DEVICE_IDS="0,1,2,3,4,5,6,7"), tpu_vm=NO_TPU).local_device_ids == tuple(range(8))


def test_slurm_single_task_or_outside_a_step_is_single_process():
    assert resolve(dict(SLURM, SLURM_NTASKS="1"), tpu_vm=NO_TPU) is None
    no_step = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}  # sbatch body, not srun
    assert resolve(no_step, tpu_vm=NO_TPU) is None


def test_slurm_coordinator_matches_jax_detection(monkeypatch):
    """We rely on jax's SLURM parsing: pin what it derives for our sbatch's env (first node, job-id port)."""
    from jax._src.clusters.slurm_cluster import SlurmCluster
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    assert SlurmCluster.is_env_present()
    assert SlurmCluster.get_coordinator_address(None, None) == f"gpu017:{4242 % 4096 + 61440}"
    assert SlurmCluster.get_coordinator_address(None, "7777") == "gpu017:7777"
    assert (SlurmCluster.get_process_count(), SlurmCluster.get_process_id()) == (32, 9)


def test_tpu_pod_auto_detection():
    spec, calls = calls_for({}, tpu_vm=lambda: True)
    assert spec.source == "tpu" and calls == [{"initialization_timeout": 300, "heartbeat_timeout_seconds": 100, "shutdown_timeout_seconds": 300}]
    gke = {"TPU_WORKER_HOSTNAMES": "a,b,c,d", "TPU_WORKER_ID": "2", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert resolve(gke, tpu_vm=NO_TPU).source == "gketpu"
    multislice = {"MEGASCALE_COORDINATOR_ADDRESS": "w-0:8080", "MEGASCALE_NUM_SLICES": "2"}
    assert resolve(multislice, tpu_vm=NO_TPU).cluster_detection_method is None  # jax picks gcetpu/gketpu


def test_forced_cluster_and_off():
    assert resolve({"OWL_CLUSTER": "mpi4py"}, tpu_vm=NO_TPU).kwargs()["cluster_detection_method"] == "mpi4py"
    assert resolve(dict(SLURM, OWL_DISTRIBUTED="off"), tpu_vm=lambda: True) is None


def test_init_failure_becomes_a_clear_error():
    def timeout(**kw):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out")
    env = {"OWL_COORDINATOR_ADDRESS": "127.0.0.1:1", "OWL_NUM_PROCESSES": "2", "OWL_PROCESS_ID": "1",
           "OWL_INIT_TIMEOUT": "5"}
    with pytest.raises(DistributedError, match=r"all 2 processes .* 127.0.0.1:1 \(waited up to 5s"):
        initialize(env, init_fn=timeout, tpu_vm=NO_TPU)


def test_this_machine_is_not_a_tpu_vm_and_describe():
    from owl_jax.distributed import describe, on_tpu_vm
    assert on_tpu_vm() is False  # CPU CI: libtpu may be installed (test extra) but there are no chips
    assert describe(None, 0, 1) == "single process"
    spec = resolve(dict(SLURM), tpu_vm=NO_TPU)
    assert describe(spec, 9, 32) == "process 9/32 (jax.distributed via slurm)"


def test_a_single_tpu_host_list_is_one_process():
    """TPU_WORKER_HOSTNAMES=localhost (a single-host TPU, or a tool describing one) joins nothing."""
    assert resolve({"TPU_WORKER_HOSTNAMES": "localhost"}, tpu_vm=lambda: False) is None
    assert resolve({"TPU_WORKER_HOSTNAMES": "a,b"}, tpu_vm=lambda: False) is not None
