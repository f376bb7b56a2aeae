"""The benchmarks end to end through `python -m owl_jax.evaluate --task BENCH` on the tiny model (random
weights, so the scores are whatever they are: what is checked is that the CLI's scores are the scorer's
on the answers it wrote, the files' formats, batch-size invariance, resuming, and the one-line errors).
Hand-computed scores are tests/test_benchmark_scorers.py's.

One model for the whole module: the tiny training run of tests/test_generate.py, loaded once; the CLI's
model load is replaced by it (one test loads the checkpoint through the CLI itself).
"""

from __future__ import annotations

import argparse
import json

import pytest

import benchmark_files as files
from test_generate import tiny_loaded, tiny_run  # noqa: F401  (module fixtures)

from owl_jax.evals import NAMES, benchmark
from owl_jax.evaluate import main as evaluate
from owl_jax.generate import Generator

ARGS = ["--batch-size", "4", "--max-new-tokens", "4"]  # one batch size everywhere: shared compiles
LLAVA_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return {name: write(root)[0] for name, write in files.WRITERS.items()}


@pytest.fixture()
def loaded_model(tiny_loaded, monkeypatch):  # noqa: F811
    """The CLI's model load replaced by the module's loaded model; counts the loads."""
    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        return tiny_loaded.config, tiny_loaded.model, tiny_loaded.tokenizer

    monkeypatch.setattr("owl_jax.evaluate.load_model_for_eval", load)
    return loads


def _cli(tiny_run, task, data, out, *extra):  # noqa: F811
    return evaluate(["--checkpoint", str(tiny_run / "run"), "--task", task, "--data", str(data), "--out", str(out),
                     *ARGS, *extra])


def _records(path):
    return [json.loads(line) for line in open(path)]


def _rescored(task, data, records):
    args = argparse.Namespace(data=str(data), image_root=None, limit=0, split=None, annotations=None,
                              caption_tokenizer="auto")
    bench = benchmark(task)
    questions, _ = bench.load(args)
    return json.loads(json.dumps(bench.score(questions, [r["text"] for r in records])))


@pytest.mark.parametrize("task", NAMES)
def test_benchmark_end_to_end(tiny_run, bench_files, loaded_model, tmp_path, capsys, task):  # noqa: F811
    out = tmp_path / f"{task}.jsonl"
    assert _cli(tiny_run, task, bench_files[task], out) == 0
    printed = capsys.readouterr().out
    records = _records(out)
    assert records and all(set(LLAVA_KEYS) <= set(r) for r in records)
    assert {r["model_id"] for r in records} == {"run"} and all(isinstance(r["text"], str) for r in records)
    suffix = {"coco": "Provide a one-sentence caption", "scienceqa": "Answer with the option's letter",
              "mmbench": "Answer with the option's letter", "seed": "Answer with the option's letter"}.get(
        task, "Answer the question using a single word or phrase.")
    assert all(suffix in r["prompt"] for r in records)
    summary = json.loads((tmp_path / f"{task}.scores.json").read_text())
    assert summary["benchmark"] == task and summary["questions"] == len(records)
    assert summary["scores"] == _rescored(task, bench_files[task], records)  # the scorer's, on the written answers
    assert f"{task} ({len(records)} questions, model run)" in printed and "scores: " in printed
    for path in summary["official_files"]:
        assert (tmp_path / path).exists() or __import__("os").path.exists(path)
    assert len(summary["official_files"]) >= len([s for s in benchmark(task).outputs if not s.endswith(".xlsx")])


@pytest.mark.parametrize("task", ["scienceqa", "mmbench"])
def test_batched_answers_equal_batch_size_1(tiny_run, bench_files, loaded_model, tmp_path, task):  # noqa: F811
    """ScienceQA mixes questions with and without a picture in a batch and prompts of many lengths;
    MMBench's rotations are prompts of one length with one image each."""
    assert _cli(tiny_run, task, bench_files[task], tmp_path / "b4.jsonl") == 0
    assert _cli(tiny_run, task, bench_files[task], tmp_path / "b1.jsonl", "--batch-size", "1") == 0
    batched, alone = _records(tmp_path / "b4.jsonl"), _records(tmp_path / "b1.jsonl")
    assert [r["text"] for r in batched] == [r["text"] for r in alone]
    assert batched == alone  # answer ids included: nothing in a record depends on the batch
    assert len({r["text"] for r in batched}) > 1  # the answers differ (a constant model would prove nothing)


def test_resume_asks_only_unanswered_questions(tiny_run, bench_files, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Interrupted after its first batch, the run has written those answers; the re-run (loading the
    checkpoint through the CLI) asks only the others and ends with the uninterrupted run's file; a
    complete file is scored without loading a model; another prompt suffix is not resumed into."""
    data = bench_files["mmbench"]
    reference = tmp_path / "reference.jsonl"
    assert _cli(tiny_run, "mmbench", data, reference) == 0
    out = tmp_path / "answers.jsonl"
    rows, real = [], Generator.generate

    def interrupted(self, prompts, settings):
        if rows:
            raise KeyboardInterrupt
        rows.append(len(prompts))
        return real(self, prompts, settings)

    monkeypatch.setattr(Generator, "generate", interrupted)
    assert _cli(tiny_run, "mmbench", data, out) == 130
    assert len(_records(out)) == 4 and "the same command resumes" in capsys.readouterr().err

    def counted(self, prompts, settings):
        rows.append(len(prompts))
        return real(self, prompts, settings)

    monkeypatch.setattr(Generator, "generate", counted)
    assert _cli(tiny_run, "mmbench", data, out) == 0
    assert rows == [4, 4, 1]  # 9 questions: 4 before the interruption, the other 5 now
    assert "resuming: 4 of 9 answers" in capsys.readouterr().err
    assert out.read_text() == reference.read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("owl_jax.evaluate.load_model_for_eval", no_model)
    assert _cli(tiny_run, "mmbench", data, out) == 0
    assert "all 9 answers are already in" in capsys.readouterr().out
    assert _cli(tiny_run, "mmbench", data, out, "--prompt-suffix", "Answer.") == 2
    err = capsys.readouterr().err
    assert "asked with another prompt" in err and len(err.strip().splitlines()) == 1


def test_a_question_that_does_not_fit_is_a_counted_skip(tiny_run, loaded_model, tmp_path, capsys):  # noqa: F811
    """A question longer than the context is answered "" with the reason in its metadata, counted, and
    the run goes on (it scores as wrong)."""
    data, _ = files.write_pope(tmp_path)
    path = data / "coco_pope_random.json"
    lines = path.read_text().splitlines()
    long = json.loads(lines[1])
    long["text"] = "Is there " + "a very long thing " * 60 + "in the image?"
    path.write_text("\n".join([lines[0], json.dumps(long)]) + "\n")
    (data / "coco_pope_adversarial.json").unlink()
    assert _cli(tiny_run, "pope", data, tmp_path / "a.jsonl") == 0
    records = _records(tmp_path / "a.jsonl")
    assert records[1]["text"] == "" and "leaves no room in the context" in records[1]["metadata"]["skipped"]
    assert records[0]["metadata"] == {} and "1 questions could not be asked" in capsys.readouterr().err
    assert json.loads((tmp_path / "a.scores.json").read_text())["skipped"] == 1


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize("case", ["missing_data", "wrong_file", "no_data", "no_out", "images_missing",
                                  "bad_image_root", "scores_file_is_a_folder", "bad_split", "no_annotations"])
def test_benchmark_user_mistakes_exit_2_before_compute(tiny_run, bench_files, tmp_path, capsys,  # noqa: F811
                                                       monkeypatch, case):
    monkeypatch.setattr("owl_jax.evaluate.load_model_for_eval", _no_model)
    (tmp_path / "wrong.json").write_text("[1, 2]")
    questions = bench_files["vqav2"]  # without its annotations file beside it
    (tmp_path / questions.name).write_bytes(questions.read_bytes())
    if case == "scores_file_is_a_folder":
        (tmp_path / "a.scores.json").mkdir()
    out = str(tmp_path / "a.jsonl")
    task, argv, expect = {
        "missing_data": ("pope", ["--data", str(tmp_path / "nope"), "--out", out], "nope does not exist"),
        "wrong_file": ("gqa", ["--data", str(tmp_path / "wrong.json"), "--out", out], "is not a GQA questions file"),
        "no_data": ("mme", ["--out", out], "needs --data"),
        "no_out": ("mme", ["--data", str(bench_files["mme"])], "needs --out"),
        "images_missing": ("textvqa", ["--data", str(bench_files["textvqa"]), "--out", out, "--image-root",
                                       str(tmp_path)], "3 of 3 images are missing under"),
        "bad_image_root": ("pope", ["--data", str(bench_files["pope"]), "--out", out, "--image-root",
                                    str(tmp_path / "x")], "--image-root"),
        "scores_file_is_a_folder": ("pope", ["--data", str(bench_files["pope"]), "--out", out],
                                    "a.scores.json is a directory"),
        "bad_split": ("scienceqa", ["--data", str(bench_files["scienceqa"]), "--out", out, "--split", "dev"],
                      "has no split 'dev'"),
        "no_annotations": ("vqav2", ["--data", str(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"), "--out",
                                     out], "v2_mscoco_val2014_annotations.json do not exist; pass --annotations"),
    }[case]
    code = evaluate(["--checkpoint", str(tiny_run / "run"), "--task", task, *argv])
    err = capsys.readouterr().err
    assert code == 2 and expect in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "a.jsonl").exists()
