"""Test-wide setup, before jax is imported anywhere: 8 fake CPU devices (sharded code paths run against
a simulated pod) and XLA's CPU backend optimisation level 0, which halves compile times (the suite is
compile-bound; the numbers stay float32-exact to the tolerances used)."""

import os
from pathlib import Path

_flags = os.environ.get("XLA_FLAGS", "")
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in _flags:
        _flags += " " + _flag
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return FIXTURES / "mplug_owl_v1_tiny"


@pytest.fixture(scope="session")
def official(golden_dir):
    """(config, checkpoint directory, tensors) of the official tiny mPLUG-Owl checkpoint."""
    from owl_jax.convert.io import load_tensors
    from owl_jax.convert.mplug_owl import read_official_config

    directory = golden_dir / "mplug_owl_tiny"
    return read_official_config(directory), directory, load_tensors(directory / "model.safetensors")
