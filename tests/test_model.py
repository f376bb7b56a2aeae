"""Model behaviour beyond parity: splicing layout checks, loss, LoRA, scan/remat equivalence, packing,
dtypes, static shapes, and the full-size 7B build."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from owl_jax.config import load_config
from owl_jax.convert.state import assign_canonical_params, canonical_params
from owl_jax.loss import masked_mean, token_nll
from owl_jax.models.layers import apply_lora, merge_lora
from owl_jax.models.owl import build_model
from owl_jax.models.splice import ImageLayoutError, plan_image_slots, splice

TINY = load_config("configs/model/tiny.yaml").model
TPI = TINY.tokens_per_image  # 9


def tiny(**changes):
    return dataclasses.replace(TINY, **changes)


def random_batch(cfg, *, batch=2, seq=48, images=(1, 0), budget=2, seed=0):
    """Token ids with `<image>` runs after a BOS, text-only rows where images==0; `budget` image slots
    (unused ones are padding images)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.text.vocab_size, size=(batch, seq))
    for b, n in enumerate(images):
        for k in range(n):
            start = 2 + k * (TPI + 2)
            ids[b, start:start + cfg.tokens_per_image] = -1
    index = plan_image_slots(ids, np.array(images), tokens_per_image=cfg.tokens_per_image, image_budget=budget)
    pixels = rng.normal(size=(budget, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    targets = np.roll(ids, -1, axis=1).clip(0)
    mask = (ids >= 0) & (targets > 0)
    mask[:, -1] = False
    return dict(tokens=jnp.asarray(ids), targets=jnp.asarray(targets), loss_mask=jnp.asarray(mask),
                pixel_values=jnp.asarray(pixels), image_index=jnp.asarray(index))


@nnx.jit
def jit_loss(model, batch):
    return model.loss(batch)


@nnx.jit
def loss_and_grads(model, batch):
    return nnx.value_and_grad(lambda m: m.loss(batch)[0])(model)


# ------------------------------------------------------------------------------------------------
# Splicing
# ------------------------------------------------------------------------------------------------


def test_plan_image_slots_numbers_images_sample_major():
    ids = np.full((3, 30), 5)
    ids[0, 2:11] = -1
    ids[0, 15:24] = -1
    ids[2, 1:10] = -1
    index = plan_image_slots(ids, np.array([2, 0, 1]), tokens_per_image=9, image_budget=4)
    assert (index[1] == -1).all()  # text-only sample in the same batch
    np.testing.assert_array_equal(index[0, 2:11], np.arange(9))
    np.testing.assert_array_equal(index[0, 15:24], 9 + np.arange(9))
    np.testing.assert_array_equal(index[2, 1:10], 18 + np.arange(9))
    assert (index[0, :2] == -1).all() and (index[0, 11:15] == -1).all()


@pytest.mark.parametrize("layout, images, message", [
    ("adjacent", [2], "adjacent placeholders"),
    ("one", [2], "1 <image> placeholders but 2 images"),
    ("two_separate", [1], "2 <image> placeholders but 1 images"),
    ("partial", [1], "partial image slot"),
    ("one", [1, 1], None),
])
def test_malformed_layouts_are_errors(layout, images, message):
    ids = np.full((len(images), 40), 7)
    runs = {"adjacent": [(2, 18)], "one": [(2, 9)], "two_separate": [(2, 9), (14, 9)], "partial": [(35, 5)]}
    for start, length in runs[layout]:
        ids[0, start:start + length] = -1
    if message is None:  # image_budget exceeded
        ids[1, 2:11] = -1
        with pytest.raises(ImageLayoutError, match="image budget is 1"):
            plan_image_slots(ids, np.array(images), tokens_per_image=9, image_budget=1)
        return
    with pytest.raises(ImageLayoutError, match=message):
        plan_image_slots(ids, np.array(images), tokens_per_image=9, image_budget=4)


def test_splice_places_each_image_at_its_slots():
    text = jnp.zeros((2, 12, 4))
    visual = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) + 1
    ids = np.full((2, 12), 1)
    ids[0, 4:7] = -1
    ids[1, 0:3] = -1
    out = np.asarray(splice(text, visual, jnp.asarray(plan_image_slots(ids, np.array([1, 1]), tokens_per_image=3,
                                                                          image_budget=2))))
    np.testing.assert_array_equal(out[0, 4:7], visual[0])
    np.testing.assert_array_equal(out[1, 0:3], visual[1])
    assert (out[0, :4] == 0).all() and (out[1, 3:] == 0).all()


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


def test_chunked_loss_equals_full_projection_values_and_grads():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 10, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, size=(3, 10)))
    mask = jnp.asarray(rng.random((3, 10)) > 0.3)

    def loss(h, k, chunk):
        return masked_mean(token_nll(h, k, targets, chunk_size=chunk), mask)[0]

    full, full_grads = jax.value_and_grad(loss, argnums=(0, 1))(hidden, kernel, 0)
    for chunk in (7, 8, 30):  # not dividing, dividing, one chunk
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(hidden, kernel, chunk)
        np.testing.assert_allclose(value, full, rtol=1e-6)
        for g, fg in zip(grads, full_grads):
            np.testing.assert_allclose(g, fg, atol=1e-6)
    logits = np.asarray(hidden) @ np.asarray(kernel)
    ref = (jax.nn.logsumexp(logits, -1) - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0])
    np.testing.assert_allclose(full, (np.asarray(ref) * np.asarray(mask)).sum() / np.asarray(mask).sum(), rtol=1e-5)


def test_all_masked_batch_gives_zero_loss_and_finite_grads():
    model = build_model(TINY)
    batch = random_batch(TINY)
    batch["loss_mask"] = jnp.zeros_like(batch["loss_mask"])
    loss, aux = jit_loss(model, batch)
    assert float(loss) == 0.0 and float(aux["tokens"]) == 0.0
    _, grads = loss_and_grads(model, batch)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in leaves)


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------


def test_lora_starts_as_identity_and_merges_exactly():
    base = build_model(TINY)
    cfg = tiny(lora=dataclasses.replace(TINY.lora, rank=4, alpha=16.0))
    adapted = build_model(cfg)
    assign_canonical_params(adapted, canonical_params(base), include=lambda p: ".lora." not in p)
    adapted.eval()
    base.eval()
    batch = random_batch(TINY)
    np.testing.assert_array_equal(jit_loss(adapted, batch)[0], jit_loss(base, batch)[0])  # B = 0

    lora_leaves = nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))
    assert len(lora_leaves) == 2 * 2 * cfg.text.num_layers  # a and b on q_proj, v_proj per layer
    for path, var in lora_leaves:
        if path[-1] == "lora_b":
            assert float(jnp.abs(var[...]).max()) == 0.0
            var[...] = jax.random.normal(jax.random.key(len(path)), var.shape) * 0.1
    unmerged = jit_loss(adapted, batch)[0]
    assert abs(float(unmerged) - float(jit_loss(base, batch)[0])) > 1e-4
    merge_lora(adapted)
    assert not nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam))
    np.testing.assert_allclose(jit_loss(adapted, batch)[0], unmerged, rtol=1e-5)


def test_lora_targets_and_dropout():
    model = build_model(TINY)
    with pytest.raises(ValueError, match="match no Linear") as error:
        apply_lora(model, targets=["no_such_layer"], rank=2, alpha=4.0, dropout=0.0, rngs=nnx.Rngs(0))
    assert "layers.layers" not in str(error.value) and "abstractor.layers.0.attention" in str(error.value)
    paths = apply_lora(model, targets=[r"language_model\..*mlp\.(gate|up)_proj$"], rank=2, alpha=4.0, dropout=0.5,
                       rngs=nnx.Rngs(0))
    assert len(paths) == 2 * TINY.text.num_layers and all("mlp" in p for p in paths)
    # targets are matched against the paths users see (the Hugging Face module paths)
    assert "language_model.layers.0.mlp.gate_proj" in paths and not any("layers.layers" in p for p in paths)
    one = apply_lora(build_model(TINY), targets=[r"^language_model\.layers\.1\.self_attn\.q_proj$"], rank=2,
                     alpha=4.0, dropout=0.0, rngs=nnx.Rngs(0))
    assert one == ["language_model.layers.1.self_attn.q_proj"]
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var[...] = jnp.ones(var.shape) * 0.05
    batch = random_batch(TINY)
    model.eval()
    assert float(jit_loss(model, batch)[0]) == float(jit_loss(model, batch)[0])
    model.train()
    nnx.update(model, nnx.state(model))
    train_losses = {float(jit_loss(model, batch)[0]) for _ in range(3)}
    assert len(train_losses) > 1  # dropout draws fresh masks each call


def test_lora_on_scanned_layers_matches_unrolled():
    lora = dataclasses.replace(TINY.lora, rank=2, alpha=8.0, dropout=0.0)
    unrolled = build_model(tiny(lora=lora))
    scanned = build_model(tiny(lora=lora, scan_layers=True))
    params = canonical_params(unrolled)
    params = {k: (v + 0.05 if k.endswith("lora_b") else v) for k, v in params.items()}
    assign_canonical_params(unrolled, params)
    assign_canonical_params(scanned, params)
    unrolled.eval()
    scanned.eval()
    batch = random_batch(TINY)
    np.testing.assert_allclose(jit_loss(scanned, batch)[0], jit_loss(unrolled, batch)[0], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Layouts: scan, remat, packing, dtypes, static shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan, remat", [(True, "none"), (False, "full"), (True, "dots_no_batch")])
def test_scan_and_remat_give_same_loss_and_grads(scan, remat):
    reference = build_model(TINY)
    variant = build_model(tiny(scan_layers=scan, remat_policy=remat))
    assign_canonical_params(variant, canonical_params(reference))
    reference.eval()
    variant.eval()
    batch = random_batch(TINY)
    (l1, g1), (l2, g2) = loss_and_grads(reference, batch), loss_and_grads(variant, batch)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    # compare gradients through the canonical (layout-independent) view
    ref_model, var_model = build_model(TINY), build_model(tiny(scan_layers=scan, remat_policy=remat))
    nnx.update(ref_model, g1)
    nnx.update(var_model, g2)
    c1, c2 = canonical_params(ref_model), canonical_params(var_model)
    assert c1.keys() == c2.keys()
    for k in c1:
        np.testing.assert_allclose(c2[k], c1[k], atol=2e-5, rtol=1e-4, err_msg=k)


def test_packed_row_equals_separate_rows():
    """Two samples packed in one row (segment ids, restarting positions) give the same per-token
    log-likelihoods as each sample alone: nothing leaks across the segment boundary."""
    model = build_model(TINY)
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 500, 10), rng.integers(3, 500, 14)
    packed = jnp.asarray(np.concatenate([a, b, [0] * 8])[None])
    segments = jnp.asarray(np.array([1] * 10 + [2] * 14 + [0] * 8)[None])
    positions = jnp.asarray(np.concatenate([np.arange(10), np.arange(14), np.arange(8)])[None])

    @nnx.jit
    def logits(m, tokens, positions, segment_ids):
        return m.logits(tokens, positions=positions, segment_ids=segment_ids)

    packed_logits = logits(model, packed, positions, segments)
    alone_a = logits(model, jnp.asarray(a[None]), jnp.arange(10)[None], jnp.ones((1, 10), jnp.int32))
    alone_b = logits(model, jnp.asarray(b[None]), jnp.arange(14)[None], jnp.ones((1, 14), jnp.int32))
    np.testing.assert_allclose(packed_logits[0, :10], alone_a[0], atol=2e-5)
    np.testing.assert_allclose(packed_logits[0, 10:24], alone_b[0], atol=2e-5)


def test_bfloat16_compute_keeps_float32_params_and_norms():
    cfg = tiny(dtype="bfloat16")
    model = build_model(cfg)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    batch = random_batch(cfg)
    loss, _ = jit_loss(model, batch)
    assert loss.dtype == jnp.float32 and bool(jnp.isfinite(loss))
    ref = build_model(TINY)
    np.testing.assert_allclose(loss, jit_loss(ref, batch)[0], rtol=3e-2)
    hidden = nnx.jit(lambda m, t: m(t))(model, batch["tokens"])
    assert hidden.dtype == jnp.bfloat16


def test_loss_compiles_once_for_new_data():
    model = build_model(TINY)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, batch):
        return nnx.merge(graphdef, state).loss(batch)[0]

    for seed in range(3):  # different image positions, text-only rows, masks: same shapes
        step(state, random_batch(TINY, images=(seed % 2, 1), seed=seed))
    assert step._cache_size() == 1


# ------------------------------------------------------------------------------------------------
# Full size
# ------------------------------------------------------------------------------------------------


def released_parameter_counts():
    """Parameter counts implied by the tensor shapes of the released mPLUG-Owl LLaMA-7B checkpoint."""
    d, mlp, layers, patches = 1024, 4096, 24, (224 // 14) ** 2
    layer = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * mlp + mlp) + (mlp * d + d)
    vision = 1 * d + 14 * 14 * 3 * d + (patches + 1) * d + 2 * d + layers * layer + 2 * d
    f, q, llm = 2816, 64, 4096
    abs_layer = 2 * d + 2 * d + 3 * (d * d + d) + (d * d + d) + 2 * d + 2 * (d * f + f) + 2 * f + (f * d + d)
    abstractor = q * d + 6 * abs_layer + (d * llm + llm) + llm  # query_tokens, layers, visual_fc, vit_eos
    v, h, ff = 32000, 4096, 11008
    llama_layer = 4 * h * h + 3 * h * ff + 2 * h
    llama = v * h + 32 * llama_layer + h + v * h
    return {"vision_model": vision, "abstractor": abstractor, "language_model": llama}


def test_owl_llama7b_builds_abstractly_with_released_parameter_counts():
    cfg = load_config("configs/model/owl_llama7b.yaml").model
    abstract = nnx.eval_shape(lambda: build_model(cfg))
    state = nnx.state(abstract, nnx.Param)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))  # nothing allocated
    counts = {}
    for path, var in nnx.to_flat_state(state):
        counts[path[0]] = counts.get(path[0], 0) + int(np.prod(var.shape))
    assert counts == released_parameter_counts()
    assert counts["language_model"] == 6_738_415_616


def test_sincos2d_position_table_encodes_the_patch_grid():
    from owl_jax.models.vision import sincos2d_position_table
    table = sincos2d_position_table(4, 16)
    assert table.shape == (17, 16) and not table[0].any()  # CLS row is zero
    rows = table[1:]
    assert len({r.tobytes() for r in rows}) == 16  # every patch position distinct
    # row-major: patch (y, x) = (1, 2) has x-sines of 2 and y-sines of 1 at the lowest frequency (1.0)
    np.testing.assert_allclose(rows[1 * 4 + 2][[0, 4, 8, 12]], [np.sin(2), np.cos(2), np.sin(1), np.cos(1)],
                               rtol=1e-6)
    cfg = tiny(vision=dataclasses.replace(TINY.vision, position_embedding_init="sincos2d"))
    model = build_model(cfg, seed=0)
    grid = cfg.vision.image_size // cfg.vision.patch_size
    np.testing.assert_array_equal(np.asarray(model.vision_model.position_embedding[...]),
                                  sincos2d_position_table(grid, cfg.vision.hidden_size))
    normal = build_model(tiny(vision=dataclasses.replace(TINY.vision, position_embedding_init="normal")), seed=0)
    assert float(np.abs(np.asarray(normal.vision_model.position_embedding[...])).max()) < 0.2
    # only the position table differs between the two inits: the random key sequence is kept
    p1, p2 = canonical_params(model), canonical_params(normal)
    assert [k for k in p1 if not np.array_equal(p1[k], p2[k])] == ["vision_model.position_embedding"]


@pytest.mark.parametrize("b, t, s, n, k, causal, segments, key_mask", [
    (2, 12, 12, 4, 4, True, True, False),    # LLaMA: causal + packed segments
    (2, 12, 12, 8, 2, True, True, False),    # grouped-query attention (4 query heads per key head)
    (2, 5, 12, 4, 4, False, False, True),    # the Q-Former's key-padding mask
    (3, 9, 17, 4, 4, False, False, False),   # cross-attention (the abstractor)
    (2, 1, 12, 4, 2, False, False, True),    # one decode query over a KV cache
])
def test_attention_equals_jax_dot_product_attention_with_gradients(b, t, s, n, k, causal, segments, key_mask):
    """`layers.attention` (written out, FlashAttention's backward) against `jax.nn.dot_product_attention`:
    outputs and the gradients of q, k and v, for every mask kind the models use."""
    import jax
    from owl_jax.models.layers import attention
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, n, 16)), jnp.float32)
    kv = [jnp.asarray(rng.normal(size=(b, s, k, 16)), jnp.float32) for _ in range(2)]
    seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(b, t)), axis=1), jnp.int32) if segments else None
    mask = jnp.asarray(rng.random((b, 1, 1, s)) > 0.3).at[:, :, :, 0].set(True) if key_mask else None

    def ours(q, key, value):
        return attention(q, key, value, causal=causal, q_segment_ids=seg, mask=mask)

    def reference(q, key, value):
        m = None if seg is None else seg[:, None, :, None] == seg[:, None, None, :]
        m = mask if m is None else m
        return jax.nn.dot_product_attention(q, jnp.repeat(key, n // k, 2), jnp.repeat(value, n // k, 2), mask=m,
                                            is_causal=causal)

    np.testing.assert_allclose(ours(q, *kv), reference(q, *kv), atol=1e-6)
    weights = jnp.asarray(rng.normal(size=(b, t, n, 16)), jnp.float32)
    grads = [jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, *kv) for f in (ours, reference)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_attention_dropout_acts_on_the_probabilities():
    from owl_jax.models.layers import attention
    rng = np.random.default_rng(1)
    q, key, value = (jnp.asarray(rng.normal(size=(2, 6, 4, 8)), jnp.float32) for _ in range(3))
    zeroed = attention(q, key, value, dropout=lambda p: jnp.zeros_like(p))
    np.testing.assert_array_equal(zeroed, 0.0)
    same = attention(q, key, value, dropout=lambda p: p)
    np.testing.assert_allclose(same, attention(q, key, value), atol=1e-6)
    with pytest.raises(ValueError, match="mask must be"):
        attention(q, key, value, mask=jnp.ones((2, 6), bool))
    assert jax.grad(lambda x: jnp.sum(attention(x, key, value, dropout=lambda p: p * 0.5)))(q).shape == q.shape
