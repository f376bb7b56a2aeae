"""Building blocks shared by the vision tower, the abstractor and the LLaMA decoder.

Every parameter is created with `nnx.with_partitioning(init, logical_axes)`: the *logical* names
(`embed`, `mlp`, `heads`, ...) are only metadata here; `owl_jax.sharding` maps them to mesh axes with the
rules table of the config. Models are therefore built under `nnx.use_eager_sharding(False)` (see
`owl_jax.models.owl.build_model`), so that construction never needs a mesh.

Norms compute in float32 whatever the compute dtype (bf16 statistics drift); matmuls run in the
configured compute dtype.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    return DTYPES[name]


def normal_init(std: float):
    return nnx.initializers.normal(stddev=std)


def fan_in_init():
    """N(0, 1/fan_in) on the `in` axis of an (in, out) kernel: keeps activations O(1) at any width."""
    return nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=-1)


class LoRA(nnx.Module):
    """Low-rank adapter `x -> dropout(x) @ a @ b * alpha / r` added to a Dense layer's output.

    `b` starts at zero so an adapted model equals its base until trained. Leaves are `nnx.LoRAParam`,
    which lets training filter them (the stage-2 trainable set) without path matching.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dropout: float,
                 in_axis: Optional[str], out_axis: Optional[str], param_dtype, rngs: nnx.Rngs):
        self.rank = rank
        self.scaling = alpha / rank
        a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=0, out_axis=1)
        self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (in_features, rank), param_dtype),
                                    out_sharding=(in_axis, "lora_rank"))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), param_dtype),
                                    out_sharding=("lora_rank", out_axis))
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout is not None:
            x = self.dropout(x)
        a = self.lora_a[...].astype(x.dtype)
        b = self.lora_b[...].astype(x.dtype)
        return (x @ a) @ b * jnp.asarray(self.scaling, x.dtype)

    def delta(self) -> jax.Array:
        """The dense (in, out) update this adapter adds to its layer's kernel."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return a @ b * self.scaling


class Dense(nnx.Module):
    """`y = x @ kernel + bias` with an (in, out) kernel, logical axis names and an optional LoRA adapter."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[Optional[str], Optional[str]],
                 use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
                 kernel_init: Callable | None = None):
        kernel_init = kernel_init or fan_in_init()
        self.in_features, self.out_features = in_features, out_features
        self.axes = tuple(axes)
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype),
                                out_sharding=self.axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), out_sharding=(self.axes[1],))
                     if use_bias else None)
        self.lora: LoRA | None = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            y = y + self.lora(x)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32; the result is cast back to the input dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype, axis_name: str = "norm"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm exactly as HF computes it: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + self.eps)
        return self.scale[...].astype(dtype) * h.astype(dtype)


def _probs(qt, kt, keep, g):
    """softmax(qt kt^T) in float32 as [B, K, G*T, S], masked where `keep` ([B|1, 1, 1, T, S]) is False."""
    b, kh, gt, _ = qt.shape
    scores = jnp.matmul(qt, jnp.swapaxes(kt, -1, -2), preferred_element_type=jnp.float32)
    if keep is not None:
        scores = jnp.where(keep, scores.reshape(b, kh, g, gt // g, -1), jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).reshape(b, kh, gt, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(qt, kt, vt, keep, g):
    """softmax(qt kt^T) vt on [B, K, G*T, H] (queries already scaled) and [B, K, S, H] keys / values.

    The backward pass is FlashAttention's: dS = P * (dP - D) with D = rowsum(dO * O), an [B, K, G*T]
    product of the output and its cotangent, instead of rowsum(dP * P) over the T x S probabilities (what
    autodiff of softmax gives). XLA:CPU fuses that T x S reduction into the dP matmul, which then runs at
    a fifth of matmul speed (the largest single cost of a small LLM's train step on CPU); without it the
    backward is four plain matmuls and elementwise work."""
    return _attend_fwd(qt, kt, vt, keep, g)[0]


def _attend_fwd(qt, kt, vt, keep, g):
    p = _probs(qt, kt, keep, g)
    out = jnp.matmul(p.astype(vt.dtype), vt)
    return out, (qt, kt, vt, keep, p, out)


def _attend_bwd(g, residuals, d_out):
    qt, kt, vt, keep, p, out = residuals
    d_v = jnp.matmul(jnp.swapaxes(p, -1, -2).astype(vt.dtype), d_out.astype(vt.dtype))
    d_p = jnp.matmul(d_out.astype(vt.dtype), jnp.swapaxes(vt, -1, -2), preferred_element_type=jnp.float32)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_s = p * (d_p - delta)
    if keep is not None:
        b, kh, gt, s = d_s.shape
        d_s = jnp.where(keep, d_s.reshape(b, kh, g, gt // g, s), 0.0).reshape(b, kh, gt, s)
    d_s = d_s.astype(qt.dtype)
    d_q = jnp.matmul(d_s, kt)
    d_k = jnp.matmul(jnp.swapaxes(d_s, -1, -2), qt)
    d_keep = None if keep is None else np.zeros(keep.shape, jax.dtypes.float0)
    return d_q, d_k.astype(kt.dtype), d_v, d_keep


_attend.defvjp(_attend_fwd, _attend_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
              q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
              mask: jax.Array | None = None, dropout: Callable[[jax.Array], jax.Array] | None = None,
              implementation: str = "xla") -> jax.Array:
    """Scaled dot-product attention on [B, T, N, H] queries and [B, S, K, H] keys/values (K divides N:
    grouped-query attention, query head i reading key head i // (N / K) as HF's `repeat_kv`).

    Segment ids (packed rows) restrict attention to equal ids; combined with `causal` this is the
    block-diagonal causal mask of packed sequences. `mask` (broadcastable to [B, 1, T, S], True = attend)
    adds to that (a key-padding mask, a KV-cache mask); `dropout` is applied to the probabilities (BERT and
    the abstractor train with attention dropout). Logits and softmax are float32; the probabilities are
    cast back to the value dtype for the second product.

    On CPU written out rather than `jax.nn.dot_product_attention(implementation="xla")` for speed on XLA:CPU
    (measured on one core, [4, 256, 8, 64] causal with segment ids, forward + backward: 54 ms there, 24 ms
    here, PyTorch eager 25 ms): jax's version vmaps over the query groups and fuses the softmax backward
    into the batched dots, which XLA:CPU's dot library then runs at a fifth of its matmul speed; here the
    heads move to the batch dimension once (explicit transposes) so every product is a plain batched
    matmul. Compiled for TPU or GPU, the same call is jax's XLA attention (`jax.lax.platform_dependent`
    picks per backend at lowering; its memory on TPU is the lower one). `implementation="cudnn"` keeps
    jax's fused GPU kernel (no dropout, no extra mask there).
    `implementation="splash"` runs causal self-attention whose length tiles (a multiple of 128) in the
    Pallas splash kernel when compiled for TPU (`owl_jax.models.splash`; the XLA path on other backends),
    everything else in the XLA path.
    """
    if implementation == "splash":
        from owl_jax.models import splash  # the Pallas import only where the kernel is asked for
        if (causal and mask is None and dropout is None and kv_segment_ids is None
                and splash.supports(q.shape[1], k.shape[1])):
            return jax.lax.platform_dependent(
                q, k, v, q_segment_ids, tpu=splash.sharded_causal_attention,
                default=lambda q, k, v, seg: attention(q, k, v, causal=True, q_segment_ids=seg))
        implementation = "xla"  # the towers, cross-attention, untiled lengths, the KV-cache decode
    if implementation != "xla":
        if dropout is not None or mask is not None:
            raise ValueError(f"attention implementation {implementation!r} takes neither dropout nor a mask")
        return jax.nn.dot_product_attention(q, k, v, mask=_segment_mask(q_segment_ids, kv_segment_ids),
                                            is_causal=causal, implementation=implementation)
    if mask is not None and (mask.ndim != 4 or mask.shape[1] != 1):
        raise ValueError(f"attention mask must be [B, 1, T, S] (one for all heads), got {mask.shape}")
    if dropout is not None:  # the abstractor's training: only the written-out form takes dropout
        return _written_out(q, k, v, causal, q_segment_ids, kv_segment_ids, mask, dropout)
    # The written-out form for XLA:CPU (see above); jax's XLA attention on TPU / GPU, where XLA's own
    # attention rewrites and memory scheduling apply to it (measured on v5p-32, mPLUG-Owl-7B stage 1: 12.30
    # GiB per chip with jax's, 15.95 GiB with the written-out form).
    return jax.lax.platform_dependent(
        q, k, v, q_segment_ids, kv_segment_ids, mask,
        cpu=lambda *a: _written_out(*a[:3], causal, *a[3:], None),
        default=lambda *a: _jax_xla(*a[:3], causal, *a[3:]))


def _segment_mask(q_segment_ids, kv_segment_ids):
    """[B, 1, T, S] True where query and key share a segment (None without segment ids)."""
    if q_segment_ids is None:
        return None
    kv = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    return q_segment_ids[:, None, :, None] == kv[:, None, None, :]


def _causal_mask(t: int, s: int):
    """[T, S] causal mask, bottom-right aligned (query i sees keys up to i + S - T: a KV-cache's rows)."""
    return (jnp.arange(t)[:, None] + (s - t)) >= jnp.arange(s)[None, :]


def _jax_xla(q, k, v, causal, q_segment_ids, kv_segment_ids, mask):
    """`jax.nn.dot_product_attention(implementation="xla")` with the segment and extra masks combined."""
    keep = _segment_mask(q_segment_ids, kv_segment_ids)
    if mask is not None:
        keep = mask if keep is None else keep & mask
    if causal and q.shape[1] != k.shape[1]:  # jax aligns top-left; the written-out form bottom-right
        tri = _causal_mask(q.shape[1], k.shape[1])
        keep, causal = (tri if keep is None else keep & tri), False
    return jax.nn.dot_product_attention(q, k, v, mask=keep, is_causal=causal, implementation="xla")


def _written_out(q, k, v, causal, q_segment_ids, kv_segment_ids, mask, dropout):
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = np.float32(1.0 / np.sqrt(h))
    # [B, K, G*T, H] @ [B, K, H, S]: the G query heads of one key head stacked along the rows
    qt = (q * scale.astype(q.dtype)).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    keep = _segment_mask(q_segment_ids, kv_segment_ids)
    if keep is not None:
        keep = keep[:, :, None]  # [B, 1, 1, T, S] beside the K, G head axes
    if causal:
        tri = _causal_mask(t, s)
        keep = tri if keep is None else keep & tri
    if mask is not None:  # [B or 1, 1, T or 1, S] -> [B, 1, 1, T, S] beside the K, G head axes
        keep = mask[:, :, None] if keep is None else keep & mask[:, :, None]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    if dropout is None:
        out = _attend(qt, kt, vt, keep, g)
    else:  # dropout on the probabilities: plain autodiff
        out = jnp.matmul(dropout(_probs(qt, kt, keep, g)).astype(v.dtype), vt)
    return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStack(nnx.Module):
    """N identical layers, either as a Python list (`layers.0`, `layers.1`, ...) or stacked along a
    leading `layers` axis and run with `nnx.scan` (one traced body: compile time independent of depth).

    Each layer is called as `layer(x, *broadcast) -> x`; `remat_policy` wraps that call in `nnx.remat`.
    """

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *, rngs: nnx.Rngs,
                 scan: bool, remat_policy: str):
        self.scan = scan
        self.num_layers = num_layers
        self.remat_policy = remat_policy
        if scan:
            @nnx.split_rngs(splits=num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(r):
                return make_layer(r)

            self.layers = create(rngs)
        else:
            self.layers = nnx.List([make_layer(rngs) for _ in range(num_layers)])

    def _wrap(self, fn):
        if self.remat_policy == "none":
            return fn
        return nnx.remat(fn, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan)

    def __call__(self, x: jax.Array, *broadcast, start: int = 0, stop: int | None = None) -> jax.Array:
        """Run layers `start .. stop - 1` (all by default; a LLaVA tower stops before its last layer)."""
        stop = self.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.num_layers:
            raise ValueError(f"layers {start}..{stop} of a {self.num_layers}-layer stack")
        if start == stop:
            return x

        def body(layer, h):
            return layer(h, *broadcast)

        body = self._wrap(body)
        if not self.scan:
            for layer in list(self.layers)[start:stop]:
                x = body(layer, x)
            return x

        layers = self.layers
        if (start, stop) != (0, self.num_layers):  # a view of the slice of every stacked leaf
            graphdef, state = nnx.split(layers)
            layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(layer, h):
            return body(layer, h)

        return run(layers, x)

    def collect(self, x: jax.Array, *broadcast) -> tuple[jax.Array, list[jax.Array]]:
        """Like __call__ but also returns every layer's output (for parity checks and debugging)."""
        outs = []
        if not self.scan:
            for layer in self.layers:
                x = layer(x, *broadcast)
                outs.append(x)
            return x, outs

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def run(layer, h):
            h = layer(h, *broadcast)
            return h, h

        x, stacked = run(self.layers, x)
        return x, [stacked[i] for i in range(self.num_layers)]


def path_str(path: Sequence) -> str:
    """`('language_model', 'layers', 0, 'attn', 'q_proj')` -> `language_model.layers.0.attn.q_proj`."""
    return ".".join(str(p) for p in path)


_STACK_SEGMENT = re.compile(r"(^|\.)layers\.layers(?=\.|$)")


def user_path(name: str) -> str:
    """A module path as users write it (in `model.lora.targets`, in messages): the `LayerStack` that holds
    the layers in its own `layers` attribute is not a level users see, so
    `language_model.layers.layers.0.self_attn.q_proj` reads `language_model.layers.0.self_attn.q_proj`
    (the Hugging Face module path). Scanned stacks have no per-layer index:
    `language_model.layers.self_attn.q_proj` stands for that projection of every layer."""
    return _STACK_SEGMENT.sub(r"\1layers", name)


class LoRATargetError(ValueError):
    """`model.lora.targets` match no Linear layer (a config mistake: shown as one line by the CLIs)."""


def apply_lora(model: nnx.Module, *, targets: Sequence[str], rank: int, alpha: float, dropout: float,
               rngs: nnx.Rngs) -> list[str]:
    """Attach LoRA adapters to every `Dense` whose dotted path matches one of the `targets` regexes
    (searched, not anchored). Returns the adapted paths; no match at all is an error, since a typo in a
    target pattern would otherwise train nothing."""
    patterns = [re.compile(t) for t in targets]
    with nnx.use_eager_sharding(False):  # logical axis names are metadata; see module docstring
        adapted = _attach_lora(model, patterns, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs)
    if not adapted:
        linear = [user_path(path_str(p)) for p, m in nnx.iter_graph(model) if isinstance(m, Dense)]
        examples = ", ".join(linear[:3] + (["..."] if len(linear) > 3 else []))
        raise LoRATargetError(f"model.lora.targets {list(targets)} match no Linear layer of the model "
                              f"(patterns are searched in paths like {examples})")
    return adapted


def _attach_lora(model, patterns, *, rank, alpha, dropout, rngs) -> list[str]:
    adapted = []
    for path, module in list(nnx.iter_graph(model)):
        if not isinstance(module, Dense):
            continue
        name = user_path(path_str(path))
        if not any(p.search(name) for p in patterns):
            continue
        param_dtype = module.kernel[...].dtype
        if module.kernel[...].ndim == 2:
            module.lora = nnx.data(LoRA(module.in_features, module.out_features, rank=rank, alpha=alpha,
                               dropout=dropout, in_axis=module.axes[0], out_axis=module.axes[1],
                               param_dtype=param_dtype, rngs=rngs))
        else:  # stacked (scanned) layers: one adapter per layer along the leading axis
            module.lora = nnx.data(_stacked_lora(module, module.kernel[...].shape[0], rank=rank, alpha=alpha,
                                                 dropout=dropout, param_dtype=param_dtype, rngs=rngs))
        adapted.append(name)
    return adapted


def _stacked_lora(dense: Dense, num_layers: int, *, rank, alpha, dropout, param_dtype, rngs) -> LoRA:
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return LoRA(dense.in_features, dense.out_features, rank=rank, alpha=alpha, dropout=dropout,
                    in_axis=dense.axes[0], out_axis=dense.axes[1], param_dtype=param_dtype, rngs=r)

    return make(rngs)


def merge_lora(model: nnx.Module) -> list[str]:
    """Fold every adapter into its base kernel (`W += a @ b * alpha/r`) and remove it."""
    merged = []
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Dense) and module.lora is not None:
            kernel = module.kernel[...]
            delta = jnp.einsum("...ir,...ro->...io", module.lora.lora_a[...].astype(jnp.float32),
                               module.lora.lora_b[...].astype(jnp.float32)) * module.lora.scaling
            module.kernel[...] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
            module.lora = nnx.data(None)
            merged.append(path_str(path))
    return merged
