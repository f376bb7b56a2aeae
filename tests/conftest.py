"""Test-wide setup: 8 fake CPU devices (so sharded code paths run against a simulated pod) and float32
matmuls at full precision. Must run before jax is imported anywhere."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return FIXTURES / "mplug_owl_v1_tiny"
