"""Accelerator peak throughput and memory, by JAX device kind (DESIGN.md §5), for MFU and AOT reports.

MFU is only as honest as its denominator: a chip not in the table gets no MFU (None) rather than a
guessed peak. Peaks are dense bf16 matmul FLOP/s per chip (one JAX device: megacore TPUs and GPUs
alike); CPU has none.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str
    peak_bf16_flops: float
    hbm_bytes: int


TPU_V4 = ChipSpec("TPU v4", 275e12, 32 * 2**30)
TPU_V5P = ChipSpec("TPU v5p", 459e12, 95 * 10**9)
TPU_V5E = ChipSpec("TPU v5e", 197e12, 16 * 10**9)
TPU_V6E = ChipSpec("TPU v6e", 918e12, 32 * 10**9)

# jax's device_kind strings (libtpu names v5p "TPU v5" and v5e / v6e "... lite").
_TPU_KINDS = {"tpu v4": TPU_V4, "tpu v5": TPU_V5P, "tpu v5p": TPU_V5P, "tpu v5 lite": TPU_V5E, "tpu v5e": TPU_V5E,
              "tpu v6 lite": TPU_V6E, "tpu v6e": TPU_V6E}

# GPUs by a substring of device_kind (e.g. "NVIDIA H100 80GB HBM3"), most specific first.
_GPU_KINDS = (
    ("h100 pcie", ChipSpec("H100 PCIe", 756e12, 80 * 10**9)),
    ("h100", ChipSpec("H100 SXM", 989e12, 80 * 10**9)),
    ("h200", ChipSpec("H200", 989e12, 141 * 10**9)),
    ("a100", ChipSpec("A100", 312e12, 80 * 10**9)),
)


def chip_spec(device_kind: str) -> ChipSpec | None:
    """The spec of a JAX device kind, or None when unknown (CPU, or a chip not in the table)."""
    kind = device_kind.strip().lower()
    if kind in _TPU_KINDS:
        return _TPU_KINDS[kind]
    for needle, spec in _GPU_KINDS:
        if needle in kind:
            return spec
    return None


def mfu(model_flops_per_second: float, device_kind: str, num_devices: int) -> float | None:
    """Model FLOP utilisation of `num_devices` devices of `device_kind`, or None for unknown chips."""
    spec = chip_spec(device_kind)
    if spec is None or num_devices <= 0:
        return None
    return model_flops_per_second / (spec.peak_bf16_flops * num_devices)
