"""The AOT tool: topology names, a real compile of the tiny recipe for a TPU topology (libtpu describes
it; no TPU needed), memory and FLOP reporting, and XLA's out-of-memory error surfaced as exit code 1."""

import os

import pytest

pytest.importorskip("libtpu", reason="the `tpu` extra (libtpu) describes TPU topologies")

from owl_jax import aot  # noqa: E402
from owl_jax.config import load_config  # noqa: E402


@pytest.mark.parametrize("name, chips, libtpu_name", [
    ("v4-32", 16, "v4:2x2x4"), ("v5p-64", 32, "v5p:2x4x4"), ("v5p-8", 4, "v5p:2x2x1"), ("v4-8", 4, "v4:2x2x1"),
    ("v5e-16", 16, "v5e:4x4"), ("v5litepod-64", 64, "v5e:8x8"), ("v6e-8", 8, "v6e:2x4"), ("v6e-1", 1, "v6e:1x1"),
])
def test_topology_names(name, chips, libtpu_name):
    chip, n, libtpu = aot.parse_topology(name)
    assert (n, libtpu) == (chips, libtpu_name)


@pytest.mark.parametrize("bad", ["v5p-12", "v3-8", "tpu-8", "v4-6"])
def test_bad_topology_names(bad):
    with pytest.raises(aot.TopologyError):
        aot.parse_topology(bad)


def test_tiny_recipe_compiles_for_v5e_8(capsys):
    # full remat, as the 7B recipes: the FLOP count must still exclude the recomputation (it would add
    # ~25%: model FLOPs are what the model needs, not what remat spends)
    assert aot.main(["--config", "configs/tiny_test.yaml", "--topology", "v5e-8", "data.global_batch_size=8",
                     "data.images_per_batch=8", "model.remat_policy=full"]) == 0
    out = capsys.readouterr().out
    assert "topology v5e-8: 8 chips in all, mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
    assert "per-chip memory" in out and "of 14.90 GiB HBM" in out
    ratio = float(out.split("ratio ")[1].split()[0])
    assert 0.95 < ratio < 1.15  # tiny widths: elementwise work is a few percent on top of the matmuls


def test_report_numbers_for_a_sharded_mesh():
    cfg = load_config("configs/tiny_test.yaml", ["data.global_batch_size=8", "data.images_per_batch=8",
                                                 "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    report = aot.compile_for_topology(cfg, "v5p-16", flops=False)
    assert report.chips == 8 and report.mesh == {"data": 2, "fsdp": 2, "tensor": 2}
    assert 0 < report.argument_bytes < report.total_bytes < report.hbm_bytes == 95 * 10**9


def test_out_of_memory_is_reported_with_xla_message(capsys):
    # 1M x 4096 embeddings + lm_head, replicated (pure data parallel), f32 with Adam: ~100 GB per chip.
    code = aot.main(["--config", "configs/tiny_test.yaml", "--topology", "v5e-8", "--no-flops",
                     "training.stage=lm_pretrain", "model.text.vocab_size=1000000", "model.text.hidden_size=4096",
                     "model.text.num_heads=32", "mesh.data=8", "mesh.fsdp=1", "data.global_batch_size=8"])
    err = capsys.readouterr().err
    assert code == 1 and "does not fit on v5e-8" in err
    assert "RESOURCE_EXHAUSTED" in err or "memory" in err.lower()


def test_unknown_topology_exits_2(capsys):
    assert aot.main(["--config", "configs/tiny_test.yaml", "--topology", "v9-8"]) == 2
    assert "unknown TPU topology" in capsys.readouterr().err


def test_multi_slice_mesh_puts_data_across_slices():
    from owl_jax.config import MeshConfig
    from owl_jax.sharding import make_mesh
    _, devices = aot.topology_devices("v5e-4", num_slices=2)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1, dcn_data=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    slices = [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)]
    assert slices == [{0}, {1}]  # only the data axis crosses the slow inter-slice network


def test_slices_must_match_dcn_data(capsys):
    assert aot.main(["--config", "configs/tiny_test.yaml", "--topology", "v5e-4", "--slices", "2"]) == 2
    assert "mesh.dcn_data" in capsys.readouterr().err


def test_describing_a_topology_leaves_the_environment_alone(monkeypatch):
    """The describe-only TPU variables are set while libtpu loads, not left for subprocesses to inherit
    (they would make a later train CLI believe it is a TPU-pod worker)."""
    from owl_jax.aot import _DESCRIBE_ONLY_ENV, topology_devices
    for key in _DESCRIBE_ONLY_ENV:
        monkeypatch.delenv(key, raising=False)
    topology_devices("v5e-8")
    assert not [k for k in _DESCRIBE_ONLY_ENV if k in os.environ]


@pytest.mark.parametrize("name, count", [("v5p-8", 4), ("v4-8", 4), ("v6e-1", 1), ("v5e-8", 8)])
def test_single_host_and_sub_host_slices_are_described(name, count):
    """One-host slices (4 chips: 2x2x1) and slices smaller than a host (v6e-1) need host bounds that fit."""
    _, devices = aot.topology_devices(name)
    assert len(devices) == count
