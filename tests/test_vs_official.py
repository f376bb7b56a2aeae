"""The vs-official benchmark's hand-off (benchmarks/vs_official.py): owl-jax and the official PyTorch
mPLUG-Owl, given the same exported weights and batch, compute the same stage-1 and stage-2 losses. Needs the
official code's virtual environment and a checkout (OWL_OFFICIAL_PYTHON, OWL_OFFICIAL_CHECKOUT); skipped
without them (CI has neither). Timings are printed by the benchmark, never checked here."""

import argparse
import os
import sys

import pytest

PYTHON = os.environ.get("OWL_OFFICIAL_PYTHON", "/work/official-venv/bin/python")
CHECKOUT = os.environ.get("OWL_OFFICIAL_CHECKOUT", "/tmp/official/mPLUG-Owl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not (os.access(PYTHON, os.X_OK) and os.path.isfile(os.path.join(CHECKOUT, "mplug_owl", "modeling_mplug_owl.py"))),
    reason="needs the official mPLUG-Owl venv and checkout (OWL_OFFICIAL_PYTHON, OWL_OFFICIAL_CHECKOUT)")


def test_tiny_stage2_losses_equal_official(monkeypatch):
    """Stage 2 hands off both the base weights and the PEFT adapter (stage 1 runs in the benchmark)."""
    stage = 2
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.chdir(ROOT)  # the benchmark loads configs/tiny_test.yaml
    import vs_official

    args = argparse.Namespace(official=CHECKOUT, python=PYTHON, threads=1, steps=2, blocks=2)
    r = vs_official.compare("tiny", stage, args)
    assert r["trainable"]["official"] == r["trainable"]["owl_jax"]
    assert len(r["losses"]["official"]) == 2
    assert r["max_loss_diff"] < 1e-5, r["losses"]
    sys.modules.pop("vs_official", None)
