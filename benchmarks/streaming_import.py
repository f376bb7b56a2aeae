"""Peak host memory of importing a ~1B-parameter LLaMA checkpoint: streaming vs eager.

Why: a 7B import must not need host memory for the whole model (several times over, with transposes and
casts). The streaming importer (`owl_jax.convert.stream`) reads one tensor at a time and places it straight
into the parameter's sharding; this measures what that costs on top of the model itself, against the
checkpoint's size and its largest tensor, and the same for the eager path (every tensor in a dict, then
assigned).

The script writes (once) a random LLaMA checkpoint in bf16, sharded safetensors with an index, shaped like
TinyLlama-1.1B by default (hidden 2048, MLP 5632, 22 layers, 32 heads / 4 KV heads, vocab 32000), to
`--dir`. Each measurement runs in a fresh subprocess: it allocates the model (zeros, bf16 like a frozen
LLM, layers scanned, placed over `--devices` CPU devices with the training mesh rules), records its RSS,
resets the kernel's peak counter (`/proc/self/clear_refs`), imports, and reports peak RSS minus the
RSS before the import. On CPU the "device" arrays live in the same process, so the model's own bytes are
in the baseline; what the import adds on top is the host cost measured here (the page cache holding the
file is not process memory).

    PYTHONPATH=. python benchmarks/streaming_import.py [--dir /tmp/owl_stream_bench] [--mode both]
        [--layers 22] [--hidden 2048] [--mlp 5632] [--vocab 32000] [--devices 8] [--unscanned]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc), so RSS reflects live memory."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _RssSampler:
    """Samples VmRSS every few milliseconds in a thread: a cross-check of the kernel's VmHWM."""

    def __init__(self, interval: float = 0.005):
        import threading
        self.peak, self._stop, self._interval = 0, threading.Event(), interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_kib("VmRSS"))
            self._stop.wait(self._interval)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kib("VmRSS"))


def _text_config(args):
    from owl_jax.config import TextConfig
    return TextConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_position_embeddings=2048)


def generate(args) -> None:
    """Write the checkpoint shard by shard (host memory: one shard)."""
    import ml_dtypes
    import numpy as np

    from owl_jax.convert import hf_configs, io

    directory = Path(args.dir)
    done = directory / "model.safetensors.index.json"
    text = _text_config(args)
    if done.is_file() and json.loads((directory / "config.json").read_text()) == hf_configs.llama_config(text, dtype="bfloat16"):
        return
    directory.mkdir(parents=True, exist_ok=True)
    shapes = _llama_shapes(text)
    rng = np.random.default_rng(0)
    groups, used = [[]], 0
    for key in sorted(shapes):
        size = int(np.prod(shapes[key])) * 2
        if groups[-1] and used + size > args.shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    weight_map, total = {}, 0
    start = time.time()
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key in keys:
            shape = shapes[key]
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= 1.0 if len(shape) == 1 else 1.0 / np.sqrt(shape[-1])
            tensors[key] = x.astype(ml_dtypes.bfloat16)
            total += tensors[key].nbytes
        io.save_safetensors(tensors, directory / name, {"format": "pt"})
        weight_map.update((k, name) for k in keys)
        print(f"  wrote {name} ({sum(t.nbytes for t in tensors.values()) / 2**20:.0f} MiB)", flush=True)
        del tensors
    (directory / "config.json").write_text(json.dumps(hf_configs.llama_config(text, dtype="bfloat16"), indent=2))
    done.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    print(f"generated {total / 2**30:.2f} GiB in {time.time() - start:.0f}s", flush=True)


def _llama_shapes(text) -> dict[str, tuple[int, ...]]:
    d, m, hd = text.hidden_size, text.intermediate_size, text.dim_per_head
    q, kv = text.num_heads * hd, text.kv_heads * hd
    shapes = {"model.embed_tokens.weight": (text.vocab_size, d), "model.norm.weight": (d,),
              "lm_head.weight": (text.vocab_size, d)}
    for i in range(text.num_layers):
        k = f"model.layers.{i}"
        shapes.update({f"{k}.input_layernorm.weight": (d,), f"{k}.post_attention_layernorm.weight": (d,),
                       f"{k}.self_attn.q_proj.weight": (q, d), f"{k}.self_attn.k_proj.weight": (kv, d),
                       f"{k}.self_attn.v_proj.weight": (kv, d), f"{k}.self_attn.o_proj.weight": (d, q),
                       f"{k}.mlp.gate_proj.weight": (m, d), f"{k}.mlp.up_proj.weight": (m, d),
                       f"{k}.mlp.down_proj.weight": (d, m)})
    return shapes


def measure(args) -> dict:
    """In this (fresh) process: allocate the model, import in `args.mode`, return the memory numbers."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from owl_jax.config import AbstractorConfig, MeshConfig, ModelConfig, VisionConfig
    from owl_jax.convert import io
    from owl_jax.convert.keymap import tensors_to_params
    from owl_jax.convert.llama import IGNORED_BUFFERS, llama_rules
    from owl_jax.convert.mplug_owl import load_hf_llama
    from owl_jax.convert.state import assign_canonical_params
    from owl_jax.models.owl import build_model
    from owl_jax.sharding import make_mesh, state_shardings

    cfg = ModelConfig(vision=VisionConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                                          image_size=28, patch_size=14),
                      abstractor=AbstractorConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96,
                                                  num_queries=4),
                      text=_text_config(args), param_dtype="bfloat16", dtype="bfloat16",
                      scan_layers=not args.unscanned)
    mesh = make_mesh(MeshConfig(), jax.devices()[: args.devices])
    # The model: parameters as zeros made in place on the devices, one small program each (a random init
    # of 1B parameters leaves GiBs of freed temporaries in the heap that would blur the measurement);
    # RNG state from a jitted init whose parameters XLA drops.
    abstract = nnx.eval_shape(lambda: build_model(cfg))
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    shardings = state_shardings(abstract_params, mesh, MeshConfig().logical_axis_rules)

    def zeros(var, sharding):
        shape, dtype = var.shape, var.dtype
        return var.replace(jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding.get_value())())

    params = jax.tree.map(zeros, abstract_params, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    rest = jax.jit(lambda: nnx.split(build_model(cfg), nnx.Param, ...)[2])()
    model = nnx.merge(graphdef, params, rest)
    jax.block_until_ready(nnx.state(model, nnx.Param))
    _trim_heap()
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    files = io.weight_files(args.dir)
    checkpoint_bytes = sum(f.stat().st_size for f in files)
    from owl_jax.convert.sources import open_source
    source = open_source(args.dir)
    largest = max(int(np.prod(source.shape(k))) * source.dtype(k).itemsize for k in source.keys())
    del source

    _trim_heap()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.time()
    with _RssSampler() as sampler:
        if args.mode == "streaming":
            load_hf_llama(model, cfg, args.dir)
        else:
            tensors = io.load_tensors(args.dir)
            loaded = tensors_to_params(tensors, llama_rules(cfg.text), ignore=IGNORED_BUFFERS)
            assign_canonical_params(model, loaded, include=lambda p: p.startswith("language_model."))
            del tensors, loaded
        jax.block_until_ready(nnx.state(model, nnx.Param))
    seconds = time.time() - start
    peak = max(_rss_kib("VmHWM"), sampler.peak)
    sampled_peak = sampler.peak
    # spot check: the last layer's q_proj really arrived (first row of the (in, out) kernel)
    last = cfg.text.num_layers - 1
    want = open_source(args.dir).read(f"model.layers.{last}.self_attn.q_proj.weight")[:, 0]
    q = model.language_model.layers.layers
    kernel = q.self_attn.q_proj.kernel[...][last] if cfg.scan_layers else q[last].self_attn.q_proj.kernel[...]
    assert np.array_equal(np.asarray(kernel[0]), want), "imported values differ from the checkpoint"
    return dict(mode=args.mode, scanned=cfg.scan_layers, devices=args.devices,
                params=int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))),
                checkpoint_gib=checkpoint_bytes / 2**30, largest_tensor_mib=largest / 2**20,
                model_gib=model_bytes / 2**30, rss_before_gib=before / 2**20, peak_rss_gib=peak / 2**20,
                sampled_peak_rss_gib=sampled_peak / 2**20,
                extra_peak_gib=(peak - before) / 2**20, seconds=seconds, **dataclasses.asdict(cfg.text))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/owl_stream_bench")
    parser.add_argument("--mode", default="both", choices=("streaming", "eager", "both"))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-bytes", type=int, default=500 * 2**20)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--unscanned", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)), flush=True)
        return 0
    generate(args)
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}").strip()
    modes = ("streaming", "eager") if args.mode == "both" else (args.mode,)
    results = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--dir", args.dir, "--layers", str(args.layers), "--hidden", str(args.hidden),
               "--mlp", str(args.mlp), "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
               "--vocab", str(args.vocab), "--devices", str(args.devices), "--mode", mode, "--child",
               *(["--unscanned"] if args.unscanned else [])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{mode:9s}: {r['params'] / 1e9:.2f}B params ({'scanned' if r['scanned'] else 'unrolled'}, "
              f"{r['devices']} devices), checkpoint {r['checkpoint_gib']:.2f} GiB (largest tensor "
              f"{r['largest_tensor_mib']:.0f} MiB), model {r['model_gib']:.2f} GiB; RSS before import "
              f"{r['rss_before_gib']:.2f} GiB, peak {r['peak_rss_gib']:.2f} GiB: import added "
              f"{r['extra_peak_gib'] * 1024:.0f} MiB = {r['extra_peak_gib'] / r['checkpoint_gib']:.2f}x the "
              f"checkpoint, in {r['seconds']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
