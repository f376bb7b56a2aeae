"""The standard benchmarks, each read from its own published files and scored offline.

One module per benchmark (reader of the official files + scorer + the official scorer's file formats):
`pope`, `scienceqa`, `mme`, `vqa` (TextVQA, VQAv2), `gqa`, `seed`, `mmbench`, `coco`; shared parts:
`normalize` (the VQA answer normalisation), `choices` (which option an answer names), `tsv`,
`caption_metrics` (PTB tokenisation, BLEU, CIDEr-D), `base`. `run` generates the answers (batched,
resumable, in the model's own conversation template) and writes the scores. The command line is
`python -m owl_jax.evaluate --task BENCH` (docs/evaluation.md).

(Named `evals`, not `benchmarks`: the repository's top-level `benchmarks/` holds performance scripts.)
"""

from __future__ import annotations

from owl_jax.evals.base import Benchmark, BenchmarkError, Question


def _classes() -> dict[str, type[Benchmark]]:
    from owl_jax.evals.coco import COCOCaptions
    from owl_jax.evals.gqa import GQA
    from owl_jax.evals.mmbench import MMBench
    from owl_jax.evals.mme import MME
    from owl_jax.evals.pope import POPE
    from owl_jax.evals.scienceqa import ScienceQA
    from owl_jax.evals.seed import SEEDBench
    from owl_jax.evals.vqa import TextVQA, VQAv2
    return {c.name: c for c in (POPE, ScienceQA, MME, TextVQA, VQAv2, GQA, SEEDBench, MMBench, COCOCaptions)}


#: The benchmark task names, in the order the docs list them.
NAMES = ("pope", "scienceqa", "mme", "textvqa", "vqav2", "gqa", "seed", "mmbench", "coco")


def benchmark(name: str) -> Benchmark:
    """A fresh benchmark object (it may keep the files it read for its official outputs)."""
    return _classes()[name]()


__all__ = ["NAMES", "Benchmark", "BenchmarkError", "Question", "benchmark"]
