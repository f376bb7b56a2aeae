"""Per-chip memory of the 7B recipes on TPU topologies, the largest micro-batch that fits, and the
compiled-vs-analytic FLOP ratio, all from ahead-of-time compiles on any machine (`owl_jax.aot`).

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/aot_memory.py [--recipe stage1|stage2 ...]
        [--topology v4-32 ...] [--search] [--flops] [--results FILE.jsonl]

For each recipe × topology it compiles the real train step at the recipe's batch and reports per-chip
arguments / temporaries / total against the chip's HBM. `--search` then halves (or doubles)
`training.grad_accum_steps` — the same samples per step in bigger (or smaller) micro-batches — until the
boundary between fitting and not fitting is found: the largest per-chip micro-batch that fits is the
step's real memory limit (activations scale with it; parameters and optimizer state do not).

`--flops` compiles each recipe unrolled at reduced depth (`--flops-layers` LLM / vision layers, full
widths: XLA's cost analysis counts a scanned layer once) and compares XLA's FLOPs with
`owl_jax.flops.step_flops` for the same shapes. A full-depth unrolled 7B compile takes hours on a small
CPU machine; per-layer work is what the ratio checks, and depth only scales it.

Compiles take minutes each, so every result is appended to `--results` (JSON lines) as it arrives, and
a rerun skips what is already there: the table can be filled over several sessions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

from owl_jax import aot
from owl_jax.config import load_config

RECIPES = {"stage1": "configs/owl_llama7b_stage1.yaml", "stage2": "configs/owl_llama7b_stage2_lora.yaml",
           "llava15_stage1": "configs/llava15_7b_stage1.yaml", "llava15_stage2": "configs/llava15_7b_stage2.yaml",
           "llava15_lora": "configs/llava15_7b_lora.yaml",
           "minigpt4_stage1": "configs/minigpt4_vicuna7b_stage1.yaml",
           "minigpt4_stage2": "configs/minigpt4_vicuna7b_stage2.yaml",
           "instructblip": "configs/instructblip_vicuna7b.yaml"}
TOPOLOGIES = ["v4-32", "v5e-64", "v5p-32", "v6e-32"]
# XLA's out-of-HBM messages: "... Used 19.80G of 15.75G hbm ..." or "... the total memory required for HLO
# temporaries (139.40G) exceeds available HBM (15.75G)" (the latter counts temporaries only)
_XLA_OOM = re.compile(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm|required for HLO temporaries \(([\d.]+)([KMGT])\)",
                      re.IGNORECASE)
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _key(row: dict) -> tuple:
    return row["kind"], row["recipe"], row["topology"], row.get("grad_accum_steps"), row.get("layers")


def load_results(path: str) -> dict[tuple, dict]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {_key(r): r for r in rows}


def append_result(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def memory_row(recipe: str, topology: str, accum: int) -> dict:
    """Compile `recipe` for `topology` with `accum` micro-batches; the row records fit or not."""
    cfg = load_config(RECIPES[recipe], [f"training.grad_accum_steps={accum}"])
    chip, chips, _ = aot.parse_topology(topology)
    rows = cfg.data.global_batch_size // accum
    row = {"kind": "memory", "recipe": recipe, "topology": topology, "grad_accum_steps": accum, "chips": chips,
           "micro_batch_rows": rows, "rows_per_chip": rows / chips, "seq_len": cfg.data.seq_len,
           "images_per_chip": cfg.data.images_per_batch // accum / chips, "hbm_gib": chip.hbm_bytes / 2**30}
    start = time.time()
    try:
        report = aot.compile_for_topology(cfg, topology, flops=False)
    except Exception as e:  # XLA: RESOURCE_EXHAUSTED ... Used 19.80G of 15.75G hbm
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
            raise
        m = _XLA_OOM.search(message)
        needed = None
        if m:
            value, unit = (m[1], m[2]) if m[1] else (m[3], m[4])
            needed = float(value) * _UNIT[unit.upper()] / 2**30
        row.update(fits=False, needed_gib=needed, xla_message=message.strip().splitlines()[0][:300],
                   seconds=time.time() - start, mesh=None)
        return row
    gib = 2**30
    row.update(fits=report.total_bytes <= report.hbm_bytes, mesh=report.mesh,
               argument_gib=report.argument_bytes / gib, temp_gib=report.temp_bytes / gib,
               total_gib=report.total_bytes / gib, needed_gib=report.total_bytes / gib,
               seconds=time.time() - start)
    return row


def flops_row(recipe: str, topology: str, layers: int) -> dict:
    """Compiled vs analytic FLOPs at full width and `layers` LLM / vision layers, unrolled."""
    overrides = [f"model.text.num_layers={layers}", f"model.vision.num_layers={layers}"]
    cfg = load_config(RECIPES[recipe], overrides)
    start = time.time()
    report = aot.compile_for_topology(cfg, topology, flops=True)
    return {"kind": "flops", "recipe": recipe, "topology": topology, "layers": layers,
            "compiled_flops": report.compiled_flops, "analytic_flops": report.analytic_flops,
            "ratio": report.compiled_flops / report.analytic_flops, "seconds": time.time() - start}


def _valid_accums(recipe: str, topology: str) -> list[int]:
    """grad_accum_steps values (powers of two) whose micro-batch splits evenly over the chips."""
    from owl_jax.sharding import resolve_mesh_shape
    cfg = load_config(RECIPES[recipe])
    _, num_chips, _ = aot.parse_topology(topology)
    data, fsdp, _ = resolve_mesh_shape(cfg.mesh, num_chips)
    chips = data * fsdp  # the batch is split over data x fsdp (tensor-parallel chips share rows)
    out, k = [], 1
    while k <= cfg.data.global_batch_size:
        rows, images = cfg.data.global_batch_size // k, cfg.data.images_per_batch // k
        if cfg.data.global_batch_size % k == 0 and rows % chips == 0 and cfg.data.images_per_batch % k == 0 \
                and images % chips == 0:
            out.append(k)
        k *= 2
    return out


def _predicted_start(first: dict, accums: list[int], recipe_accum: int) -> int:
    """Index in `accums` to compile first. Temporaries scale with the micro-batch, arguments do not: from
    the recipe's compile, predict the smallest accumulation (largest micro-batch) that fits with 3%
    headroom."""
    if not (first["fits"] and first.get("temp_gib")):
        return accums.index(recipe_accum)
    scale = (0.97 * first["hbm_gib"] - first["argument_gib"]) / max(first["temp_gib"], 1e-9)
    return accums.index(min((k for k in accums if k >= recipe_accum / scale), default=max(accums)))


def _boundary_found(fits_at: dict[int, bool], accums: list[int]) -> bool:
    """True when the smallest fitting accumulation is known: it fits and the next smaller one does not
    (or it is the smallest possible)."""
    fitting = [k for k in accums if fits_at.get(k)]
    if not fitting:
        return False
    best = min(fitting)
    i = accums.index(best)
    return i == 0 or fits_at.get(accums[i - 1]) is False


def run(recipes, topologies, *, search: bool, flops: bool, flops_layers: int, results: str) -> dict:
    done = load_results(results)

    def get(row_key, compute):
        if row_key not in done:
            row = compute()
            append_result(results, row)
            done[row_key] = row
            print(json.dumps(row), flush=True)
        return done[row_key]

    for recipe in recipes:
        for topology in topologies:
            # the recipe's accumulation, or the nearest that splits its micro-batch over this many chips
            accums = _valid_accums(recipe, topology)
            wanted = load_config(RECIPES[recipe]).training.grad_accum_steps
            recipe_accum = max([k for k in accums if k <= wanted], default=min(accums))
            first = get(("memory", recipe, topology, recipe_accum, None),
                        lambda: memory_row(recipe, topology, recipe_accum))
            if not search:
                continue
            # walk from the prediction: down (bigger micro-batches) while it fits, up while it does not
            fits_at = {recipe_accum: first["fits"]}
            i = _predicted_start(first, accums, recipe_accum)
            while 0 <= i < len(accums) and not _boundary_found(fits_at, accums):
                k = accums[i]
                row = get(("memory", recipe, topology, k, None), lambda k=k: memory_row(recipe, topology, k))
                fits_at[k] = row["fits"]
                i = i - 1 if row["fits"] else i + 1
    if flops:
        for recipe in recipes:
            get(("flops", recipe, topologies[0], None, flops_layers),
                lambda recipe=recipe: flops_row(recipe, topologies[0], flops_layers))
    return done


def table(done: dict) -> str:
    """Markdown: per recipe × topology, the recipe-batch row and the largest micro-batch that fits."""
    rows = [r for r in done.values() if r["kind"] == "memory"]
    lines = ["| recipe | topology | chips | grad accum | rows / chip | images / chip | arguments | temporaries "
             "| total per chip | HBM | fits |", "|" + " --- |" * 11]
    for r in sorted(rows, key=lambda r: (r["recipe"], r["topology"], -r["grad_accum_steps"])):
        if r["fits"]:
            mem = (f"{r['argument_gib']:.2f} GiB", f"{r['temp_gib']:.2f} GiB", f"{r['total_gib']:.2f} GiB")
            fits = f"yes ({100 * r['total_gib'] / r['hbm_gib']:.0f}%)"
        else:
            temporaries_only = "HLO temporaries" in r.get("xla_message", "")
            needed = f"{r['needed_gib']:.2f} GiB needed" if r.get("needed_gib") else "—"
            mem = ("—", needed, "—") if temporaries_only else ("—", "—", needed)
            fits = "**no**"
        lines.append(f"| {r['recipe']} | {r['topology']} | {r['chips']} | {r['grad_accum_steps']} | "
                     f"{r['rows_per_chip']:g} × {r['seq_len']} | {r['images_per_chip']:g} | {mem[0]} | {mem[1]} | "
                     f"{mem[2]} | {r['hbm_gib']:.2f} GiB | {fits} |")
    flop_rows = [r for r in done.values() if r["kind"] == "flops"]
    if flop_rows:
        lines += ["", "| recipe | topology | layers (LLM, vision) | compiled FLOPs | analytic FLOPs | ratio |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in flop_rows:
            lines.append(f"| {r['recipe']} | {r['topology']} | {r['layers']} | {r['compiled_flops']:.4g} | "
                         f"{r['analytic_flops']:.4g} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def largest_fitting(done: dict, recipe: str, topology: str) -> dict | None:
    fitting = [r for r in done.values() if r["kind"] == "memory" and r["recipe"] == recipe
               and r["topology"] == topology and r["fits"]]
    return min(fitting, key=lambda r: r["grad_accum_steps"]) if fitting else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", action="append", choices=sorted(RECIPES))
    p.add_argument("--topology", action="append")
    p.add_argument("--search", action="store_true", help="find the largest micro-batch that fits")
    p.add_argument("--flops", action="store_true", help="compiled vs analytic FLOPs at reduced depth")
    p.add_argument("--flops-layers", type=int, default=2)
    p.add_argument("--results", default="docs/aot_memory.jsonl")
    p.add_argument("--table-only", action="store_true", help="print the table of what --results holds")
    a = p.parse_args(argv)
    if a.table_only:
        done = load_results(a.results)
    else:
        done = run(a.recipe or sorted(RECIPES), a.topology or TOPOLOGIES, search=a.search, flops=a.flops,
                   flops_layers=a.flops_layers, results=a.results)
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
