"""Generate a Kubernetes JobSet for GKE (TPU slices or GPU nodes), or the equivalent `xpk` command line.

A JobSet runs one Indexed Job per TPU slice, one pod per host, and gives them a headless service so the
hosts find each other; GKE's TPU webhook then sets `TPU_WORKER_HOSTNAMES` / `TPU_WORKER_ID`, which jax's
cluster detection reads. Multi-slice adds the `MEGASCALE_*` variables (coordinator = pod 0 of slice 0).
GPU JobSets get an explicit `OWL_COORDINATOR_ADDRESS` / `OWL_NUM_PROCESSES` / `OWL_PROCESS_ID` spec (the
process id is the pod's job-completion index), one process per node with all its GPUs.

    python launch/gke_jobset.py --name owl-s1 --image us-docker.pkg.dev/p/r/owl:v1 \\
        --accelerator tpu-v5-lite-podslice --topology 4x4 --hosts 4 --dry-run -- --config configs/s1.yaml

Without --dry-run the YAML is written to --output and applied with `kubectl apply -f`.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):  # `python launch/gke_jobset.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import add_train_args, emit, train_argv  # noqa: E402

MEGASCALE_PORT = 8080
GPU_COORDINATOR_PORT = 12355


def _field(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def _annotation(key: str) -> dict[str, Any]:
    return _field(f"metadata.annotations['{key}']")


def container_env(kind: str, num_slices: int, hosts: int, extra: Sequence[tuple[str, str]]) -> list[dict]:
    """The env list: JobSet identity first, so later values can use `$(JOBSET_NAME)`."""
    env: list[dict[str, Any]] = [
        {"name": "JOBSET_NAME", **_annotation("jobset.sigs.k8s.io/jobset-name")},
        {"name": "REPLICATED_JOB_NAME", **_annotation("jobset.sigs.k8s.io/replicatedjob-name")},
    ]
    if kind == "tpu" and num_slices > 1:
        env += [
            {"name": "MEGASCALE_COORDINATOR_ADDRESS",
             "value": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(num_slices)},
            {"name": "MEGASCALE_SLICE_ID", **_annotation("jobset.sigs.k8s.io/job-index")},
            {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
        ]
    if kind == "gpu":
        env += [
            {"name": "OWL_COORDINATOR_ADDRESS",
             "value": f"$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME):{GPU_COORDINATOR_PORT}"},
            {"name": "OWL_NUM_PROCESSES", "value": str(hosts)},
            {"name": "OWL_PROCESS_ID", **_annotation("batch.kubernetes.io/job-completion-index")},
        ]
    env += [{"name": k, "value": v} for k, v in extra]
    return env


def jobset(name: str, image: str, train_args: Sequence[str], *, kind: str = "tpu", accelerator: str,
           topology: str | None = None, hosts: int = 1, chips_per_host: int = 4, num_slices: int = 1,
           env: Sequence[tuple[str, str]] = (), python: str = "python") -> dict[str, Any]:
    """The JobSet manifest as a dict (yaml.safe_dump turns it into what `kubectl apply` gets)."""
    if kind not in ("tpu", "gpu"):
        raise ValueError(f"kind must be tpu or gpu, not {kind!r}")
    if kind == "gpu" and num_slices != 1:
        raise ValueError("--num-slices is for TPU slices; use --hosts for more GPU nodes")
    if kind == "tpu":
        if not topology:
            raise ValueError("TPU JobSets need --topology (e.g. 4x4)")
        chips = math.prod(int(x) for x in topology.split("x"))
        if chips != hosts * chips_per_host:
            raise ValueError(f"topology {topology} has {chips} chips but --hosts {hosts} x --chips-per-host "
                             f"{chips_per_host} = {hosts * chips_per_host}")
        selector = {"cloud.google.com/gke-tpu-accelerator": accelerator, "cloud.google.com/gke-tpu-topology": topology}
        limits = {"google.com/tpu": chips_per_host}
    else:
        selector = {"cloud.google.com/gke-accelerator": accelerator}
        limits = {"nvidia.com/gpu": chips_per_host}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "nodeSelector": selector,
        "containers": [{
            "name": "owl",
            "image": image,
            "command": ["bash", "-c", shlex.join(train_argv(train_args, python=python))],
            "env": container_env(kind, num_slices, hosts, env),
            "resources": {"limits": limits},
        }],
    }
    if kind == "tpu":
        # DCN traffic between slices and the megascale port use the host network (as xpk does).
        pod_spec |= {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name,
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {"maxRestarts": 0},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [{
                "name": "slice" if kind == "tpu" else "workers",
                "replicas": num_slices,
                "template": {"spec": {
                    "parallelism": hosts, "completions": hosts, "backoffLimit": 0,
                    "completionMode": "Indexed",
                    "template": {"spec": pod_spec},
                }},
            }],
        },
    }


def xpk_command(name: str, image: str, train_args: Sequence[str], *, cluster: str, tpu_type: str,
                num_slices: int = 1, zone: str | None = None, project: str | None = None) -> list[str]:
    """The same TPU workload through xpk (it writes the JobSet and the MEGASCALE env itself)."""
    return ["xpk", "workload", "create", "--cluster", cluster, "--workload", name, "--tpu-type", tpu_type,
            "--num-slices", str(num_slices), "--docker-image", image,
            *(["--zone", zone] if zone else []), *(["--project", project] if project else []),
            "--command", shlex.join(train_argv(train_args))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/gke_jobset.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="JobSet / workload name")
    parser.add_argument("--image", required=True, help="container image with owl-jax installed")
    parser.add_argument("--kind", choices=("tpu", "gpu"), default="tpu")
    parser.add_argument("--accelerator", help="GKE node label value, e.g. tpu-v5-lite-podslice, nvidia-h100-80gb")
    parser.add_argument("--topology", help="TPU slice topology, e.g. 4x4")
    parser.add_argument("--hosts", type=int, default=1, help="pods per slice (TPU hosts / GPU nodes)")
    parser.add_argument("--chips-per-host", type=int, default=4, help="TPU chips or GPUs per pod")
    parser.add_argument("--num-slices", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", help="YAML file to write (default <name>.jobset.yaml)")
    parser.add_argument("--xpk", action="store_true", help="print/run an `xpk workload create` command instead")
    parser.add_argument("--cluster", help="for --xpk: the GKE cluster")
    parser.add_argument("--tpu-type", help="for --xpk: e.g. v5litepod-16")
    parser.add_argument("--zone")
    parser.add_argument("--project")
    add_train_args(parser)
    args = parser.parse_args(argv)
    bad = [e for e in args.env if "=" not in e]
    if bad:
        parser.error(f"--env expects KEY=VALUE, got {bad}")
    if args.xpk:
        if not (args.cluster and args.tpu_type):
            parser.error("--xpk needs --cluster and --tpu-type")
        cmd = xpk_command(args.name, args.image, args.train_args, cluster=args.cluster, tpu_type=args.tpu_type,
                          num_slices=args.num_slices, zone=args.zone, project=args.project)
        if args.dry_run:
            emit(shlex.join(cmd))
            return 0
        import subprocess
        return subprocess.call(cmd)
    if not args.accelerator:
        parser.error("--accelerator is required (the GKE node label value)")
    try:
        manifest = jobset(args.name, args.image, args.train_args, kind=args.kind, accelerator=args.accelerator,
                          topology=args.topology, hosts=args.hosts, chips_per_host=args.chips_per_host,
                          num_slices=args.num_slices, env=[tuple(e.split("=", 1)) for e in args.env])
    except ValueError as e:
        parser.error(str(e))
    text = yaml.safe_dump(manifest, sort_keys=False)
    output = args.output or f"{args.name}.jobset.yaml"
    apply = ["kubectl", "apply", "-f", output]
    if args.dry_run:
        emit(f"# {output}\n{text}# then: {shlex.join(apply)}")
        return 0
    Path(output).write_text(text)
    import subprocess
    return subprocess.call(apply)


if __name__ == "__main__":
    sys.exit(main())
