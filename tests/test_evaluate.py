"""Evaluation that writes answers (`owl_jax.evaluate --task owleval`): answers that do not depend on the batch
(every row stops on its own budget), `--out` checked before any compute, answers written as they are
produced, and a re-run that resumes from them; questions-file errors with their real line number;
`model_id` of a run's step directory.

The model is the tiny training run of tests/test_generate.py (random weights, SentencePiece tokenizer).
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from test_generate import tiny_loaded, tiny_run  # noqa: F401  (module fixtures)

from owl_jax.chat import DEFAULT_STOP, ChatError, ChatSession
from owl_jax.evaluate import answer_key, main as evaluate, owleval_answers, read_jsonl
from owl_jax.generate import GenerationSettings, Generator
from owl_jax.loading import model_name

SETTINGS = GenerationSettings(max_new_tokens=12, stop_strings=DEFAULT_STOP)  # = the CLI's --max-new-tokens 12
LONG_ROOM = 3  # new tokens the long question leaves in the model's context


class _Spy:
    """A Generator that records, per generated row, (its own budget, tokens generated, batch size)."""

    def __init__(self, generator):
        self.generator, self.rows = generator, []

    def generate(self, prompts, settings):
        out = self.generator.generate(prompts, settings)
        self.rows += [(p.max_new_tokens, len(g.tokens), len(prompts)) for p, g in zip(prompts, out)]
        return out


@pytest.fixture(scope="module")
def owleval(tiny_run, tiny_loaded, tmp_path_factory):
    """(image root, questions, generator): five questions on four pictures, one of them so long that it
    leaves only LONG_ROOM tokens of the 256-token context, one dialogue of two turns."""
    root = tmp_path_factory.mktemp("owleval")
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
    cfg, tok = tiny_loaded.config, tiny_loaded.tokenizer
    session = ChatSession.for_config(cfg, tok)
    session.add_image(np.zeros((56, 56, 3), np.float32))
    def room(question: str) -> int:
        try:
            return session.room(session.prompt(question))
        except ChatError:  # no room at all
            return 0

    long_question = "what is in the picture"
    for word in [" red"] * 400 + [" a"] * 10 + ["?"] * 10:
        if room(long_question + word) >= LONG_ROOM:
            long_question += word
    assert room(long_question) == LONG_ROOM
    questions = [{"image": "0.png", "question_id": 1, "question": long_question},
                 {"image": "1.png", "question_id": "1-1", "question": "what is it?"},
                 {"image": "2.png", "question_id": 3, "question": "a green square?"},
                 {"image": "1.png", "question_id": "1-2", "question": "what is in the picture?"},
                 {"image": "3.png", "question_id": 5, "question": "what is on the left?"}]
    generator = Generator(tiny_loaded.model, tok, tokens_per_image=cfg.model.tokens_per_image,
                          image_size=cfg.model.vision.image_size)
    return root, questions, generator


def _answers(tiny_loaded, owleval, questions=None, **kw):
    root, all_questions, generator = owleval
    spy = _Spy(generator)
    answers = owleval_answers(tiny_loaded.config, tiny_loaded.model, tiny_loaded.tokenizer,
                              all_questions if questions is None else questions, str(root), settings=SETTINGS,
                              model_id="m", generator=spy, **kw)
    return {a["question_id"]: a["answer"] for a in answers}, spy.rows


def test_owleval_answers_do_not_depend_on_the_batch(tiny_loaded, owleval):
    questions = owleval[1]
    batched, rows = _answers(tiny_loaded, owleval, batch_size=4)
    # the long question's row stopped at its room while rows of the same batch went on: under a batch-wide
    # budget (the smallest room of the batch) those answers would have been cut to LONG_ROOM tokens
    assert (LONG_ROOM, LONG_ROOM, 4) in rows
    assert any(n > LONG_ROOM and b == 4 for _, n, b in rows), rows
    alone, _ = _answers(tiny_loaded, owleval, batch_size=1)
    subset, _ = _answers(tiny_loaded, owleval, [questions[i] for i in (4, 3, 0, 1)], batch_size=4)
    assert alone == batched
    assert subset == {k: batched[k] for k in subset}
    assert len(set(batched.values())) > 2  # the answers really differ (a constant model would prove nothing)
    # resuming: answers given earlier enter the history; the rest equal the uninterrupted run's
    earlier = {answer_key("1-1"): batched["1-1"]}
    resumed, rows = _answers(tiny_loaded, owleval, batch_size=4, answered=earlier)
    assert resumed == batched and len(rows) == 4  # 1-1 was not asked again, 1-2 was (after 1-1's answer)


def _run(tiny_run, owleval, tmp_path, *extra, checkpoint=None):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in owleval[1]))
    return evaluate(["--checkpoint", str(checkpoint or tiny_run / "run"), "--task", "owleval", "--questions",
                     str(questions), "--image-root", str(owleval[0]), "--max-new-tokens", "12", *extra])


def test_owleval_writes_as_it_goes_and_resumes(tiny_run, tiny_loaded, owleval, tmp_path, capsys, monkeypatch):
    """Killed after its first batch, a run has written those answers; a truncated last line (a kill in
    mid-write) is dropped and asked again; the re-run asks only what is missing and ends with the same
    file an uninterrupted run writes, in question order."""
    reference, _ = _answers(tiny_loaded, owleval, batch_size=4)
    out = tmp_path / "answers.jsonl"
    calls = []
    real = Generator.generate

    def interrupted(self, prompts, settings):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, prompts, settings)

    monkeypatch.setattr(Generator, "generate", interrupted)
    step_dir = tiny_run / "run" / "checkpoints" / "1"
    assert _run(tiny_run, owleval, tmp_path, "--out", str(out), "--batch-size", "2", checkpoint=step_dir) == 130
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in written] == [1, "1-1"]  # the first batch, flushed as produced
    assert {a["model_id"] for a in written} == {"run-step1"}
    assert "the same command resumes" in capsys.readouterr().err
    with open(out, "a") as f:
        f.write(json.dumps({**written[0], "question_id": 3})[:25])  # a kill in mid-line
    monkeypatch.setattr(Generator, "generate", real)
    assert _run(tiny_run, owleval, tmp_path, "--out", str(out), "--batch-size", "2", checkpoint=step_dir) == 0
    cap = capsys.readouterr()
    assert "resuming: 2 of 5 answers" in cap.err and "truncated last line dropped" in cap.err
    assert "3 new, 2 from an earlier run" in cap.out
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in final] == [q["question_id"] for q in owleval[1]]
    assert {a["question_id"]: a["answer"] for a in final} == reference
    # a model that fails to load leaves no empty answers file behind
    assert _run(tiny_run, owleval, tmp_path, "--out", str(tmp_path / "new.jsonl"),
                checkpoint=tmp_path / "no-such-run") == 2
    assert not (tmp_path / "new.jsonl").exists() and "no-such-run" in capsys.readouterr().err
    # complete: a third run loads no model and leaves the file as it is
    monkeypatch.setattr("owl_jax.evaluate.load_model_for_eval", _no_model)
    before = out.read_bytes()
    assert _run(tiny_run, owleval, tmp_path, "--out", str(out), checkpoint=step_dir) == 0
    assert "all 5 answers are already in" in capsys.readouterr().out and out.read_bytes() == before
    # another model's answers are not resumed into (nor overwritten)
    assert _run(tiny_run, owleval, tmp_path, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "model_id 'run-step1', not 'run'" in err and len(err.strip().splitlines()) == 1


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize("case", ["missing_dir", "under_a_file", "a_directory", "read_only", "not_answers",
                                  "out_for_vqa", "broken_questions"])
def test_evaluate_user_mistakes_exit_2_before_compute(tiny_run, owleval, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr("owl_jax.evaluate.load_model_for_eval", _no_model)
    (tmp_path / "file").write_text("x")
    (tmp_path / "garbage.jsonl").write_text("PK\x03\x04 not json\n{\"question_id\": 1}\n")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: use a file system that refuses
        read_only = "/sys"
    out = {"missing_dir": tmp_path / "nope" / "a.jsonl", "under_a_file": tmp_path / "file" / "a.jsonl",
           "a_directory": tmp_path, "read_only": f"{read_only}/a.jsonl", "not_answers": tmp_path / "garbage.jsonl",
           "out_for_vqa": tmp_path / "a.jsonl", "broken_questions": tmp_path / "a.jsonl"}[case]
    extra = ["--out", str(out)]
    if case == "out_for_vqa":
        extra += ["--task", "vqa"]
    if case == "broken_questions":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"question_id": 1, "question": "a"}\n\n{"question_id": 2, "question": "b",}\n')
        extra += ["--questions", str(bad)]
    code = _run(tiny_run, owleval, tmp_path, *extra)
    err = capsys.readouterr().err
    expect = {"missing_dir": "does not exist", "under_a_file": "is a file, not a directory",
              "a_directory": "is a directory", "read_only": "cannot be written", "not_answers": "line 1 is not an answer",
              "out_for_vqa": "--out is for the tasks that write answers",
              "broken_questions": "bad.jsonl line 3, column 36: not valid JSON"}[case]
    assert code == 2 and expect in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert (tmp_path / "garbage.jsonl").read_text().startswith("PK")  # never overwritten
    assert not (tmp_path / "a.jsonl").exists()


def test_read_jsonl_counts_blank_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": "x\u2028y"}\n[1]\n', encoding="utf-8")  # U+2028: not a line end
    with pytest.raises(ValueError, match=r"q.jsonl line 5: expected a JSON object, got list"):
        read_jsonl(str(path))
    assert read_jsonl(str(path), limit=2) == [{"a": 1}, {"a": "x\u2028y"}]


def test_model_name_of_a_step_directory(tmp_path):
    assert model_name(tmp_path / "myrun" / "checkpoints" / "12") == "myrun-step12"
    assert model_name(f"{tmp_path}/myrun/checkpoints/12/") == "myrun-step12"
    assert model_name(tmp_path / "myrun") == "myrun"
    assert model_name(tmp_path / "hf" / "mplug-owl-7b") == "mplug-owl-7b"
