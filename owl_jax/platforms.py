"""Which JAX platforms to try, decided before JAX starts its backends.

The `test` and `tpu` extras install libtpu (the AOT tool needs it to describe TPU topologies on any
machine). JAX then tries the TPU backend on every start, and libtpu, finding no chips, prints ~6 lines of
host-bounds and `libtpu_init_utils.cc` errors on stderr before JAX falls back to the CPU — on every
command, on every laptop and GPU box. JAX only skips that attempt when `JAX_PLATFORMS` names the platforms,
so owl-jax names them for the user when the answer is certain:

- no TPU chip on the PCI bus and no GPU device node: `cpu`;
- NVIDIA GPUs visible and JAX's CUDA plugin installed: `cuda,cpu`;
- anything else (TPU chips present, other accelerators, or `JAX_PLATFORMS` already set): left alone.

Describing a TPU topology for ahead-of-time compiles (`owl_jax.aot`) loads libtpu on its own, so it keeps
working under `JAX_PLATFORMS=cpu`. The choice is made once, when `owl_jax` is imported, and only fills in
an unset variable; it has no effect if the JAX backends were started before that import.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import MutableMapping

_GOOGLE_PCI_VENDOR = "0x1ae0"
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl")
_OTHER_ACCELERATOR_DEVICES = ("/dev/kfd", "/dev/accel0", "/dev/vfio/0")
_CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13", "jax_cuda12_plugin", "jax_cuda13_plugin")


def tpu_chips_present(pci_root: str = "/sys/bus/pci/devices") -> bool:
    """Whether a Google TPU chip is on the PCI bus (how JAX's own `hardware_utils` counts chips)."""
    for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _cuda_plugin_installed() -> bool:
    for name in _CUDA_PLUGINS:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def default_platforms(*, tpu: bool | None = None, nvidia: bool | None = None, other: bool | None = None,
                      cuda_plugin: bool | None = None) -> str | None:
    """The `JAX_PLATFORMS` value that skips a pointless TPU probe on this machine, or None to leave JAX be.
    The keyword arguments override what is read off the machine (for tests)."""
    tpu = tpu_chips_present() if tpu is None else tpu
    nvidia = any(os.path.exists(d) for d in _NVIDIA_DEVICES) if nvidia is None else nvidia
    other = any(os.path.exists(d) for d in _OTHER_ACCELERATOR_DEVICES) if other is None else other
    if tpu or other:
        return None
    if nvidia:
        return "cuda,cpu" if (_cuda_plugin_installed() if cuda_plugin is None else cuda_plugin) else None
    return "cpu"


def set_default_platforms(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Fill in `JAX_PLATFORMS` when it is unset and the machine's platforms are certain; returns the value set."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_PLATFORMS"):
        return None
    value = default_platforms()
    if value is not None:
        environ["JAX_PLATFORMS"] = value
    return value
