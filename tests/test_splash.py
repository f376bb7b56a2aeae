"""`model.attention_impl=splash`: the Pallas splash kernel (run in interpret mode here, no TPU needed) equals
owl-jax's XLA attention, outputs and gradients, for packed and unpacked rows and grouped-query heads; on the
mesh (shard_map over data × fsdp rows and tensor heads) it equals one device; on CPU the model routes to the
XLA path; a TPU compile of the train step puts the kernel in the program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.config import ConfigError, load_config
from owl_jax.models import splash
from owl_jax.models.layers import attention


def _qkv(b=2, t=128, n=4, k=2, h=32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h)), jax.random.normal(keys[1], (b, t, k, h)),
            jax.random.normal(keys[2], (b, t, k, h)))


def _packed(b, t):
    # two samples in row 0 (a boundary mid-tile), three in row 1
    seg = np.zeros((b, t), np.int32)
    seg[0, 50:] = 1
    seg[1, 20:], seg[1, 90:] = 1, 2
    return jnp.asarray(seg)


def _loss_and_grads(fn, q, k, v):
    return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("heads, kv_heads, packed", [(4, 4, True), (4, 2, True), (4, 1, False)])
def test_kernel_equals_xla_attention(heads, kv_heads, packed):
    q, k, v = _qkv(n=heads, k=kv_heads)
    seg = _packed(2, 128) if packed else None
    ref = lambda q, k, v: attention(q, k, v, causal=True, q_segment_ids=seg)
    got = lambda q, k, v: splash.causal_attention(q, k, v, seg, interpret=True)
    np.testing.assert_allclose(got(q, k, v), ref(q, k, v), atol=2e-6, rtol=1e-5)
    (l1, g1), (l2, g2) = _loss_and_grads(got, q, k, v), _loss_and_grads(ref, q, k, v)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=1e-5)


def test_sharded_kernel_equals_one_device():
    # rows over data × fsdp, heads over tensor: each device's kernel sees its block (DESIGN.md §3: every
    # sharded computation against a one-device run)
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:8])
    q, k, v = _qkv(b=4, n=4, k=2)
    seg = jnp.concatenate([_packed(2, 128)] * 2)
    fn = jax.jit(lambda q, k, v: _loss_and_grads(
        lambda q, k, v: splash.sharded_causal_attention(q, k, v, seg, interpret=True), q, k, v))
    with jax.set_mesh(mesh):
        lowered = fn.lower(q, k, v).as_text()
        (loss, grads) = fn(q, k, v)
    assert "manual" in lowered.lower()  # the kernel ran per shard, not on gathered operands
    ref_loss, ref_grads = _loss_and_grads(lambda q, k, v: attention(q, k, v, causal=True, q_segment_ids=seg),
                                          q, k, v)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=1e-5)


def test_untiled_lengths_are_refused_by_the_kernel_and_routed_by_attention():
    q, k, v = _qkv(t=96)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.causal_attention(q, k, v, None, interpret=True)
    # attention() serves what the kernel cannot tile (prefill buckets, the towers) on the XLA path
    np.testing.assert_array_equal(attention(q, k, v, causal=True, implementation="splash"),
                                  attention(q, k, v, causal=True))


def test_model_on_cpu_runs_the_xla_path_with_gradients():
    q, k, v = _qkv()
    seg = _packed(2, 128)
    ref = lambda q, k, v: attention(q, k, v, causal=True, q_segment_ids=seg)
    routed = lambda q, k, v: attention(q, k, v, causal=True, q_segment_ids=seg, implementation="splash")
    (l1, g1), (l2, g2) = _loss_and_grads(jax.jit(routed), q, k, v), _loss_and_grads(jax.jit(ref), q, k, v)
    np.testing.assert_array_equal(l1, l2)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)


def test_config_wants_a_tiling_sequence_length():
    with pytest.raises(ConfigError, match="data.seq_len must be a multiple of 128, got 96"):
        load_config("configs/tiny_test.yaml", ["model.attention_impl=splash"])
    assert load_config("configs/tiny_test.yaml", ["model.attention_impl=splash", "data.seq_len=128"])


def test_tpu_compile_of_the_train_step_runs_the_kernel():
    pytest.importorskip("libtpu", reason="the `tpu` extra (libtpu) describes TPU topologies")
    from owl_jax import aot
    # head_dim 128 as the 7B LLMs (the kernel's lane width); rows over data × fsdp, heads over tensor
    cfg = load_config("configs/tiny_test.yaml", [
        "model.attention_impl=splash", "data.seq_len=128", "model.text.hidden_size=256", "model.text.num_heads=2",
        "data.global_batch_size=8", "data.images_per_batch=8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    _, devices = aot.topology_devices("v5p-16")
    _, compiled, _ = aot._compile(cfg, devices)
    text = compiled.as_text()
    assert "tpu_custom_call" in text
    assert text.count("splash") >= 2  # the forward kernel and the backward (dq, dkv) kernels
