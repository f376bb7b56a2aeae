"""benchmarks/aot_memory.py's search for the largest micro-batch that fits, on recorded compile results
(no compiles here: each 7B compile takes minutes)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import aot_memory  # noqa: E402

ACCUMS = [1, 2, 4, 8, 16]


def test_prediction_starts_at_the_largest_micro_batch_the_recipe_compile_suggests():
    # 11 GiB of temporaries at accumulation 8 with 1.2 GiB of arguments on an 88.5 GiB chip: 7.7x room
    first = {"fits": True, "temp_gib": 11.0, "argument_gib": 1.2, "hbm_gib": 88.5}
    assert ACCUMS[aot_memory._predicted_start(first, ACCUMS, 8)] == 2
    tight = {"fits": True, "temp_gib": 12.6, "argument_gib": 0.2, "hbm_gib": 14.9}
    assert ACCUMS[aot_memory._predicted_start(tight, ACCUMS, 4)] == 4
    assert ACCUMS[aot_memory._predicted_start({"fits": False}, ACCUMS, 8)] == 8


def test_boundary_needs_a_fit_next_to_a_failure_or_the_smallest_accumulation():
    assert not aot_memory._boundary_found({8: True}, ACCUMS)
    assert aot_memory._boundary_found({8: True, 2: True, 1: False}, ACCUMS)
    assert not aot_memory._boundary_found({8: True, 2: True}, ACCUMS)
    assert aot_memory._boundary_found({1: True}, ACCUMS)
    assert not aot_memory._boundary_found({8: False, 16: False}, ACCUMS)


def test_table_lists_fitting_and_failing_compiles(tmp_path):
    path = str(tmp_path / "r.jsonl")
    base = {"kind": "memory", "recipe": "stage1", "topology": "v4-32", "chips": 16, "seq_len": 512, "hbm_gib": 32.0}
    aot_memory.append_result(path, {**base, "grad_accum_steps": 8, "rows_per_chip": 8, "images_per_chip": 32,
                                    "fits": True, "argument_gib": 1.2, "temp_gib": 11.0, "total_gib": 12.2})
    aot_memory.append_result(path, {**base, "grad_accum_steps": 2, "rows_per_chip": 32, "images_per_chip": 128,
                                    "fits": False, "needed_gib": 45.3})
    done = aot_memory.load_results(path)
    text = aot_memory.table(done)
    assert "| stage1 | v4-32 | 16 | 8 | 8 × 512 | 32 |" in text and "yes (38%)" in text
    assert "45.30 GiB needed" in text and "**no**" in text
    assert aot_memory.largest_fitting(done, "stage1", "v4-32")["grad_accum_steps"] == 8
