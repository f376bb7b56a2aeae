"""Ahead-of-time compile of the real train step for a TPU topology, on any machine (CPU included).

    python -m owl_jax.aot --config configs/owl_llama7b_stage1.yaml --topology v5p-32 [key=value ...]

libtpu (the `tpu` extra) describes the topology; XLA then compiles exactly the program the pod would
run and reports per-chip memory, or fails with the same out-of-memory message the pod would give. A
second, unrolled compile (layers not scanned, loss not chunked: XLA's cost analysis counts a loop body
once; no remat: recomputation is not model FLOPs) gives the compiled FLOPs to compare with the analytic
model FLOPs of `owl_jax.flops`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from typing import Sequence

import contextlib

from owl_jax import chips
from owl_jax.config import Config, ConfigError, load_config
from owl_jax.sharding import MeshError

# The TPU runtime must not look for real TPU hardware or metadata servers when only describing one, and
# describing a topology owns no TPU (concurrent compiles and test runs may share libtpu). Set only while
# libtpu loads: left in os.environ they would make every later subprocess look like a TPU-pod worker.
_DESCRIBE_ONLY_ENV = {"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost",
                      "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@contextlib.contextmanager
def _describe_only_env():
    added = {k: v for k, v in _DESCRIBE_ONLY_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@dataclasses.dataclass(frozen=True)
class TpuChip:
    generation: str
    hbm_bytes: int
    peak_bf16_flops: float
    cores_per_chip_in_name: int  # v4/v5p names count TensorCores (2 per chip); v5e/v6e count chips
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)


def _tpu(generation: str, spec: chips.ChipSpec, cores_in_name: int, dims: int) -> TpuChip:
    return TpuChip(generation, spec.hbm_bytes, spec.peak_bf16_flops, cores_in_name, dims)


CHIPS = {
    "v4": _tpu("v4", chips.TPU_V4, 2, 3),
    "v5p": _tpu("v5p", chips.TPU_V5P, 2, 3),
    "v5e": _tpu("v5e", chips.TPU_V5E, 1, 2),
    "v6e": _tpu("v6e", chips.TPU_V6E, 1, 2),
}
_LIBTPU_NAMES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v6e": "v6e"}


class TopologyError(ValueError):
    pass


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """A near-cubic (or near-square) chip grid as Cloud TPU slices are shaped (e.g. 16 v5p chips: 2x2x4)."""
    if chips & (chips - 1):
        raise TopologyError(f"{chips} chips is not a power of two")
    shape = [1] * dims
    i = 0
    while math.prod(shape) < chips:
        shape[i % dims] *= 2
        i += 1
    # ascending, with unit dimensions last: Cloud TPU names 4 v4/v5p chips 2x2x1 (one host), not 1x2x2
    ordered = sorted(shape)
    return tuple([d for d in ordered if d > 1] + [1] * ordered.count(1))


def parse_topology(name: str) -> tuple[TpuChip, int, str]:
    """`v5p-32` -> (chip, number of chips, libtpu topology string like `v5p:2x2x4`)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise TopologyError(f"unknown TPU topology {name!r}; write it as Cloud TPU does, e.g. v4-32, v5e-16, "
                            f"v5p-64, v6e-8")
    generation = "v5e" if m[1] == "v5litepod" else m[1]
    chip = CHIPS[generation]
    count = int(m[2])
    if count % chip.cores_per_chip_in_name:
        raise TopologyError(f"{name}: {generation} sizes count {chip.cores_per_chip_in_name} cores per chip")
    chips = count // chip.cores_per_chip_in_name
    shape = _torus_shape(chips, chip.dims)
    return chip, chips, f"{_LIBTPU_NAMES[generation]}:{'x'.join(map(str, shape))}"


def _host_bounds(libtpu_name: str) -> tuple[int, int, int]:
    """Chips per host as libtpu wants them: 2x2x1 (4 chips), or the whole slice when it is smaller."""
    shape = [int(d) for d in libtpu_name.split(":")[1].split("x")] + [1]
    return min(shape[0], 2), min(shape[1], 2), 1


def topology_devices(name: str, num_slices: int = 1):
    """(chip, devices) of `num_slices` slices of topology `name` (multi-slice devices carry slice_index)."""
    from jax.experimental import topologies
    chip, chips, libtpu_name = parse_topology(name)
    try:
        with _describe_only_env():
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=libtpu_name,
                chip_config_name="megacore" if chip.cores_per_chip_in_name == 2 else "default",
                chips_per_host_bounds=_host_bounds(libtpu_name), num_slices=num_slices, wrap=(False,) * 3)
    except Exception as e:  # libtpu missing or the topology unsupported
        raise TopologyError(f"cannot describe {name} ({libtpu_name}): {e}. Is the `tpu` extra (libtpu) "
                            f"installed?") from e
    return chip, topology.devices


@dataclasses.dataclass
class AotReport:
    topology: str
    chips: int
    mesh: dict
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    hbm_bytes: int
    compile_seconds: float
    compiled_flops: float | None = None
    analytic_flops: float | None = None

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def lines(self) -> list[str]:
        gib = 2**30
        out = [f"topology {self.topology}: {self.chips} chips in all, mesh {self.mesh}, compiled in "
               f"{self.compile_seconds:.1f}s",
               f"per-chip memory: arguments {self.argument_bytes / gib:.2f} GiB, outputs "
               f"{self.output_bytes / gib:.2f} GiB (aliased {self.alias_bytes / gib:.2f} GiB), temporaries "
               f"{self.temp_bytes / gib:.2f} GiB, total {self.total_bytes / gib:.2f} GiB of "
               f"{self.hbm_bytes / gib:.2f} GiB HBM ({100 * self.total_bytes / self.hbm_bytes:.0f}%)"]
        if self.compiled_flops is not None and self.analytic_flops:
            out.append(f"FLOPs per step: compiled {self.compiled_flops:.4g}, analytic {self.analytic_flops:.4g}, "
                       f"ratio {self.compiled_flops / self.analytic_flops:.3f}")
        return out


def _compile(cfg: Config, devices):
    import jax
    from owl_jax.sharding import batch_shardings, make_mesh
    from owl_jax.training.train_step import abstract_batch, abstract_train_state, jit_step
    mesh = make_mesh(cfg.mesh, devices)
    graphdef, abstract_state, shardings, schedule, _ = abstract_train_state(cfg, mesh)
    batch = abstract_batch(cfg)
    step = jit_step(graphdef, cfg, schedule, shardings, batch_shardings(batch, mesh))
    start = time.time()
    with jax.set_mesh(mesh):  # as Trainer.step traces it (kernels without a partitioning rule shard_map on it)
        compiled = step.lower(abstract_state, batch).compile()
    return mesh, compiled, time.time() - start


def compile_for_topology(cfg: Config, topology: str, *, flops: bool = True, num_slices: int = 1) -> AotReport:
    """Compile the train step for `num_slices` x `topology`; raises the XLA error (e.g. out of HBM) if it
    does not fit. Multi-slice runs put `mesh.dcn_data` on the data axis across slices."""
    from owl_jax.flops import compiled_flops, step_flops
    if num_slices != cfg.mesh.dcn_data:
        raise TopologyError(f"--slices {num_slices} but mesh.dcn_data={cfg.mesh.dcn_data}; they must agree")
    chip, devices = topology_devices(topology, num_slices)
    mesh, compiled, seconds = _compile(cfg, devices)
    mem = compiled.memory_analysis()
    report = AotReport(topology=topology, chips=len(devices), mesh=dict(mesh.shape),
                       argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                       alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                       hbm_bytes=chip.hbm_bytes, compile_seconds=seconds)
    if flops:
        # Model FLOPs exclude remat's recomputation (full remat adds ~25% at 7B widths), so this compile
        # does not recompute: it exists only to be counted.
        unrolled = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False,
                                                                      loss_chunk_size=0, remat_policy="none"))
        _, flat, _ = _compile(unrolled, devices)
        k = cfg.training.grad_accum_steps  # the micro-batch loop body is counted once
        rows = cfg.data.global_batch_size // k
        from owl_jax.training.stages import uses_images
        images = cfg.data.images_per_batch // k if uses_images(cfg.training.stage) else 0
        report.compiled_flops = compiled_flops(flat) * len(devices)  # per-device SPMD program
        report.analytic_flops = step_flops(cfg.model, cfg.training, tokens=rows * cfg.data.seq_len,
                                           seq_len=cfg.data.seq_len, images=images, causal_halving=False).total
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owl_jax.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--topology", required=True, help="e.g. v4-32, v5e-64, v5p-32, v6e-8")
    parser.add_argument("--slices", type=int, default=1, help="multi-slice: number of slices (= mesh.dcn_data)")
    parser.add_argument("--no-flops", action="store_true", help="skip the unrolled compile for FLOP counting")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        report = compile_for_topology(cfg, args.topology, flops=not args.no_flops, num_slices=args.slices)
    except (ConfigError, TopologyError, MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # XLA's out-of-memory and other compile errors, as the pod would report them
        message = str(e)
        if "RESOURCE_EXHAUSTED" in message or "ran out of memory" in message.lower():
            print(f"does not fit on {args.topology}:\n{message}", file=sys.stderr)
            return 1
        raise
    print("\n".join(report.lines()))
    if report.total_bytes > report.hbm_bytes:
        # XLA may still emit a program whose buffer assignment exceeds the chip's HBM estimate.
        print(f"does not fit on {args.topology}: {report.total_bytes / 2**30:.2f} GiB per chip needed, "
              f"{report.hbm_bytes / 2**30:.2f} GiB available", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
