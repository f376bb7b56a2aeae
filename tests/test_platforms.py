"""A machine without TPU chips runs owl-jax quietly: no libtpu start-up errors on stderr (the `test` and
`tpu` extras install libtpu, which JAX would otherwise try on every start)."""

import os
import subprocess
import sys

from owl_jax.platforms import default_platforms, set_default_platforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_platform_choice():
    assert default_platforms(tpu=False, nvidia=False, other=False) == "cpu"
    assert default_platforms(tpu=True, nvidia=False, other=False) is None  # a TPU VM: JAX decides
    assert default_platforms(tpu=False, nvidia=True, other=False, cuda_plugin=True) == "cuda,cpu"
    assert default_platforms(tpu=False, nvidia=True, other=False, cuda_plugin=False) is None
    assert default_platforms(tpu=False, nvidia=False, other=True) is None  # ROCm and others: untouched
    env = {"JAX_PLATFORMS": "tpu"}
    assert set_default_platforms(env) is None and env == {"JAX_PLATFORMS": "tpu"}  # the user's choice stays


def test_cpu_commands_print_no_tpu_errors(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = ROOT
    code = "import owl_jax, jax; print(jax.devices()[0].platform)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    if default_platforms() == "cpu":  # (on a TPU or GPU machine JAX's own choice stands)
        assert result.stdout.strip() == "cpu"
        noise = [line for line in result.stderr.splitlines() if "TPU" in line or "libtpu" in line]
        assert noise == [], noise
    # data_pipelines alone (make_shards, inspect) gets the same treatment
    result = subprocess.run([sys.executable, "-c", "import data_pipelines, os; print(os.environ.get('JAX_PLATFORMS'))"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == str(default_platforms())
