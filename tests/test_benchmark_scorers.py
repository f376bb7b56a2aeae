"""Every benchmark scorer on small files in its published format (tests/benchmark_files.py), with the
expected scores computed by hand, the edge cases of the official scorers included; the answer
normalisation; the caption metrics against pycocoevalcap. No model: tests/test_benchmarks.py runs them
end to end."""

from __future__ import annotations

import argparse
import json
import math

import pytest

import benchmark_files as files
from owl_jax.evals import benchmark
from owl_jax.evals.base import BenchmarkError


def _load(name, tmp_path, writer=None, limit=0):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data, _ = (writer or files.WRITERS[name])(tmp_path)
    args = argparse.Namespace(data=str(data), image_root=None, limit=limit, split=None, annotations=None,
                              caption_tokenizer="python")
    bench = benchmark(name)
    questions, root = bench.load(args)
    return bench, questions, root


def test_pope_yes_no_parsing_and_metrics(tmp_path):
    from owl_jax.evals.pope import pope_answer
    assert [pope_answer(t) for t in ("Yes, there is a dog.", "No.", "There is no cat.", "Nope", "not sure. Yes",
                                      "Yes. There is no cat", "no,", "NO")] == \
        ["yes", "no", "no", "yes", "no", "yes", "no", "yes"]  # only the first sentence; "NO" is not a word it knows
    bench, questions, root = _load("pope", tmp_path)
    # the official order of the splits, not the files' name order
    assert [q.group["split"] for q in questions] == ["random"] * 4 + ["adversarial"] * 3
    assert questions[0].fields == {"question_id": 1, "category": "random"} and root.endswith("val2014")
    texts = [a for *_, a in files.POPE_RANDOM] + [a for *_, a in files.POPE_ADVERSARIAL]
    s = bench.score(questions, texts)
    # random: TP (Yes, there is), TN (No.), FN (There is no cat), FP (Nope)
    assert (s["random"]["TP"], s["random"]["TN"], s["random"]["FN"], s["random"]["FP"]) == (1, 1, 1, 1)
    assert all(s["random"][m] == 0.5 for m in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
    # adversarial: TP, FN (the first sentence says "not"), TN; no FP
    a = s["adversarial"]
    assert (a["TP"], a["FN"], a["TN"], a["FP"]) == (1, 1, 1, 0)
    assert a["accuracy"] == pytest.approx(2 / 3) and a["precision"] == 1.0 and a["recall"] == 0.5
    assert a["f1"] == pytest.approx(2 / 3) and a["yes_ratio"] == pytest.approx(1 / 3)
    assert s["average"]["f1"] == pytest.approx((0.5 + 2 / 3) / 2) and s["average"]["count"] == 7


def test_scienceqa_letters_and_official_table(tmp_path):
    from owl_jax.evals.scienceqa import scienceqa_letter
    assert [scienceqa_letter(t) for t in ("B", "A. a", "C", "I think it is D", "The answer is B.",
                                          "The answer is A. The answer is B.", "F", "b", "(A)")] == \
        ["B", "A", "C", "FAILED", "B", "FAILED", "FAILED", "FAILED", "FAILED"]
    bench, questions, root = _load("scienceqa", tmp_path)
    assert [q.question_id for q in questions] == list(files.SQA)  # the test split only
    assert questions[0].image == "5/image.png" and questions[1].image is None and root.endswith("images/test")
    assert questions[1].text == "Context: A story.\nWhich word comes first?\nA. a\nB. b\nC. c"
    s = bench.score(questions, [a for _, a in files.SQA.values()])
    # right: 5 (B), 6 (A. a), 9 (The answer is B.); wrong: 7 (C names no choice of 2), 8 and 10 (no letter)
    expect = {"average": 3 / 6, "has_image": 1 / 2, "has_text": 1 / 2, "no_context": 1 / 3, "natural": 2 / 3,
              "social": 1 / 2, "language": 0.0, "grade_1_6": 1 / 3, "grade_7_12": 2 / 3}
    assert {g: s[g]["accuracy"] for g in expect} == pytest.approx(expect)
    assert s["failed"] == 2 and s["average"]["count"] == 6
    bench.write_official(questions, [a for _, a in files.SQA.values()], str(tmp_path / "a"))
    result = json.loads((tmp_path / "a.sqa_result.json").read_text())
    assert result["results"] == {"5": 1, "6": 0, "7": -1, "8": -1, "9": 1, "10": -1} and result["acc"] == 50.0


@pytest.mark.parametrize("layout", ["folder", "tsv"])
def test_mme_official_score(tmp_path, layout):
    from owl_jax.evals.mme import mme_answer
    assert [mme_answer(t) for t in ("Yes", "no.", "No, there is not.", "Not sure", "I think so", "", "yess")] == \
        ["yes", "no", "no", "no", "other", "other", "yes"]  # the official rule: "no" in the first 4 characters
    bench, questions, root = _load("mme", tmp_path, files.write_mme if layout == "folder" else files.write_mme_tsv)
    assert len(questions) == 8 and [q.group["task"] for q in questions[::2]] == ["existence", "existence", "artwork",
                                                                                  "code_reasoning"]  # official order
    if layout == "folder":
        assert questions[4].image == "artwork/images/10002.jpg" and questions[4].fields["question_index"] == 0
    else:
        assert questions[1].image == questions[0].image  # row 1 refers to row 0's picture
    texts = [a for qa in files.MME.values() for *_, a in qa]
    s = bench.score(questions, texts)
    assert (s["existence"]["accuracy"], s["existence"]["accuracy_plus"], s["existence"]["score"]) == (0.75, 0.5, 125.0)
    assert s["artwork"]["score"] == 50.0 and s["code_reasoning"]["score"] == 50.0 and s["existence"]["other"] == 1
    assert s["perception"] == {"score": 175.0, "subtasks": 2, "complete": False}
    assert s["cognition"]["score"] == 50.0
    paths = bench.write_official(questions, texts, str(tmp_path / "a"))
    lines = (tmp_path / "a.mme" / "existence.txt").read_text().splitlines()
    assert len(paths) == 3 and len(lines) == 4
    name = "000000006040.jpg" if layout == "folder" else "0.jpg"
    assert lines[1] == f"{name}\tIs there a bed in this image? Please answer yes or no.\tNo\tNo, there is not."


def test_vqa_normalisation_and_accuracy(tmp_path):
    from owl_jax.evals.normalize import normalize_answer, vqa_accuracy
    cases = {"Two dogs.": "2 dogs", "The man's hat": "man 's hat", "3.5": "3.5", "1,000": "1000", "yes!": "yes",
             "left-hand": "left hand", "ten o'clock": "10 o'clock", "oclock": "o'clock", "dont": "don't",
             "A (big) dog": "big dog", "red, white": "red white", "An apple\n": "apple", "none": "0",
             "e.g. this": "eg this", "Yes": "yes", "hello - world": "hello world"}
    assert {k: normalize_answer(k) for k in cases} == cases

    def official(pred, answers):  # m4c_evaluator's loop, for comparison with the closed form
        gts = list(enumerate(normalize_answer(a) for a in answers))
        p = normalize_answer(pred)
        return sum(min(1, sum(1 for o in gts if o != g and o[1] == p) / 3) for g in gts) / len(gts)

    for pred, answers, _ in files.TEXTVQA:
        assert vqa_accuracy(pred, answers) == pytest.approx(official(pred, answers))
    bench, questions, root = _load("textvqa", tmp_path)
    assert questions[0].image == "img0.jpg" and root.endswith("train_images")
    s = bench.score(questions, [a for *_, a in files.TEXTVQA])
    # "Two." = "two" = "2": 5 of 10 -> 1; "Red!": 2 of 10 -> 0.6; "dont know" = "don't know": 1 of 10 -> 0.3
    assert s["overall"]["accuracy"] == pytest.approx((1 + 0.6 + 0.3) / 3)
    bench, questions, root = _load("vqav2", tmp_path)
    assert questions[1].image == "COCO_val2014_000000000043.jpg"
    s = bench.score(questions, [a for *_, a in files.VQAV2])
    # "two" matches 2, 2, two (3 of 10): each left-out "3" leaves 3 matches (1), each left-out match 2 (2/3)
    assert s["yes/no"]["accuracy"] == 1.0 and s["number"]["accuracy"] == pytest.approx(0.9)
    assert s["overall"]["accuracy"] == pytest.approx(0.95)
    bench.write_official(questions, ["Yes", "Two dogs."], str(tmp_path / "v"))
    assert json.loads((tmp_path / "v.submission.json").read_text()) == [{"question_id": 420, "answer": "yes"},
                                                                       {"question_id": 421, "answer": "2 dogs"}]


def test_gqa_exact_match(tmp_path):
    bench, questions, root = _load("gqa", tmp_path)
    texts = [a for *_, a in files.GQA.values()]
    s = bench.score(questions, texts)
    # "Yes." is right both ways; "The left." only after normalisation (LLaVA's rstrip('.').lower() keeps "the")
    assert (s["overall"]["accuracy"], s["overall"]["exact"]) == pytest.approx((2 / 3, 1 / 3))
    assert (s["verify"]["accuracy"], s["query"]["accuracy"], s["query"]["exact"]) == (1.0, 0.5, 0.0)
    bench.write_official(questions, texts, str(tmp_path / "g"))
    assert json.loads((tmp_path / "g.gqa_predictions.json").read_text())[1] == {"questionId": "20968057",
                                                                              "prediction": "the left"}


def test_seed_letters_per_dimension(tmp_path):
    from owl_jax.evals.choices import infer_option
    options = {"A": "one", "B": "two", "C": "three", "D": "four"}
    assert [infer_option(t, options) for t in ("A", "(B) two", "The answer is C.", "I see three", "A or B", "B, C",
                                                "Cannot determine the answer", "Z", "xyz")] == \
        ["A", "B", "C", "C", None, None, "Z", "Z", None]
    bench, questions, root = _load("seed", tmp_path)
    assert len(questions) == 4  # the video question is left out
    assert questions[0].text == "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four"
    s = bench.score(questions, [a for *_, a in files.SEED])
    assert s["overall"]["accuracy"] == 0.75 and s["Scene Understanding"]["accuracy"] == 0.5
    assert s["Instance Counting"]["accuracy"] == 1.0


def test_mmbench_circular_evaluation(tmp_path):
    from owl_jax.evals.mmbench import rotation_letter
    assert [rotation_letter(x, 1, 4) for x in ("A", "B", "D", None, "E")] == ["B", "C", "A", None, None]
    bench, questions, _ = _load("mmbench", tmp_path)
    assert [(q.question_id, q.fields["round_id"]) for q in questions] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0),
                                                                           (1, 1), (2, 0), (2, 1), (2, 2)]
    assert questions[1].fields["options"] == ["banana", "cherry", "date", "apple"]
    assert questions[1].text == ("Look closely.\nWhich one is it (question 0)?\nA. banana\nB. cherry\nC. date\n"
                                 "D. apple")
    assert questions[4].image == questions[0].image  # row 1's image cell refers to row 0
    texts = [a for *_, answers in files.MMBENCH for a in answers]
    s = bench.score(questions, texts)
    # 0: right in every rotation (C, B, A, then "cherry" by its text); 1: the rotations disagree ("A" both times);
    # 2: "A or C" names two letters (undecided: wrong)
    assert s["overall"]["accuracy"] == pytest.approx(1 / 3) and s["single"]["accuracy"] == 1.0
    assert s["category/cat1"]["accuracy"] == 0.5 and s["category/cat2"]["accuracy"] == 0.0
    assert s["l2-category/l2a"]["count"] == 2 and s["undecided"] == 1
    bench.write_official(questions, texts, str(tmp_path / "m"))
    table = (tmp_path / "m.mmbench.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table[1].split("\t")[6] == "C" and len(table) == 4


def test_mmbench_xlsx_submission_is_the_tsv(tmp_path):
    openpyxl = pytest.importorskip("openpyxl", reason="no openpyxl: no .xlsx (the eval extra)")
    bench, questions, _ = _load("mmbench", tmp_path)
    texts = ["\x06C"] + ["A"] * (len(questions) - 1)  # a control character: not allowed in a worksheet
    bench.write_official(questions, texts, str(tmp_path / "m"))
    table = [line.split("\t") for line in (tmp_path / "m.mmbench.tsv").read_text().splitlines()]
    table[1][6] = "C"
    sheet = openpyxl.load_workbook(tmp_path / "m.mmbench.xlsx").active
    assert [[str(c.value) for c in row] for row in sheet.iter_rows()] == table


def test_coco_bleu_and_cider_by_hand(tmp_path):
    from owl_jax.evals.caption_metrics import bleu, cider_d
    # every n-gram of the hypotheses is in a reference; lengths 5 + 2 against the closest 5 + 3: BP = e^(1 - 8/7)
    hyp = {1: "a dog runs on grass", 2: "a cat"}
    refs = {1: ["a dog runs on grass", "the dog is running"], 2: ["a small cat", "a cat sits on a mat"]}
    assert bleu(hyp, refs) == pytest.approx([math.exp(1 - 8 / 7)] * 4, rel=1e-6)
    # disjoint vocabularies: a hypothesis equal to all its references scores 10, one sharing nothing 0
    hyp = {1: "red bus parked here", 2: "zebra grazing", 3: "two dogs play in snow"}
    refs = {1: ["red bus parked here"] * 2, 2: ["a cat on a mat"] * 2, 3: ["two dogs play in snow"] * 2}
    assert cider_d(hyp, refs) == pytest.approx(20 / 3)
    bench, questions, root = _load("coco", tmp_path)
    assert [q.question_id for q in questions] == [391895, 522418, 184613]  # the test split
    assert questions[0].image == "val2014/COCO_val2014_000000391895.jpg"
    s = bench.score(questions, [c for *_, c in files.COCO[:3]])
    assert s["tokenizer"] == "python" and 0 < s["Bleu_4"] < 1 and s["CIDEr"] > 0


def test_caption_metrics_match_pycocoevalcap():
    """The ports against pycocoevalcap's own scorers, and the pure-Python tokenizer against its Java PTB
    tokenizer (skipped without pycocoevalcap / java)."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from owl_jax.evals.caption_metrics import bleu, cider_d, ptb_jar, ptb_tokenize, python_tokenize
    refs = {i: r for i, (_, _, r, _) in enumerate(files.COCO)}
    refs[4] = ["A man's dog, running on the beach.", "Two \"cats\" sit (quietly) -- on a mat!",
               "I don't think it's there; can't you see?", "A black-and-white photo of 1,000 people at 3.5 p.m."]
    hyps = {0: "a man riding a bike", 1: "two dogs play", 2: "a red bus parked at the station", 3: "a train",
            4: "a man's dog running on a beach"}
    tok_refs = {k: [python_tokenize(r) for r in v] for k, v in refs.items()}
    tok_hyps = {k: python_tokenize(v) for k, v in hyps.items()}
    theirs_bleu, _ = Bleu(4).compute_score(tok_refs, {k: [v] for k, v in tok_hyps.items()}, verbose=0)
    theirs_cider, _ = Cider().compute_score(tok_refs, {k: [v] for k, v in tok_hyps.items()})
    assert bleu(tok_hyps, tok_refs) == pytest.approx(theirs_bleu, abs=1e-12)
    assert cider_d(tok_hyps, tok_refs) == pytest.approx(theirs_cider, abs=1e-12)
    jar = ptb_jar()
    if jar is None:
        pytest.skip("no java for the PTB tokenizer")
    captions = [c for v in refs.values() for c in v] + list(hyps.values())
    assert [python_tokenize(c) for c in captions] == ptb_tokenize(captions, jar)


@pytest.mark.parametrize("name", ["pope", "scienceqa", "mme", "textvqa", "vqav2", "gqa", "seed", "mmbench", "coco"])
def test_missing_or_wrong_benchmark_files_name_what_is_missing(tmp_path, name):
    args = argparse.Namespace(data=str(tmp_path / "nothing"), image_root=None, limit=0, split=None, annotations=None,
                              caption_tokenizer="python")
    with pytest.raises(BenchmarkError, match="nothing") as e:
        benchmark(name).load(args)
    assert "\n" not in str(e.value)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"x": 1}')
    args.data = str(wrong)
    with pytest.raises(BenchmarkError) as e:
        benchmark(name).load(args)
    assert "\n" not in str(e.value) and ("wrong.json" in str(e.value) or "pid_splits" in str(e.value)), e.value


def test_limit_takes_whole_items(tmp_path):
    """--limit N: the first N of each POPE split, N MME images (both questions each), N MMBench questions
    (every rotation of each)."""
    assert [q.group["split"] for q in _load("pope", tmp_path / "p", limit=2)[1]] == ["random"] * 2 + ["adversarial"] * 2
    assert len(_load("mme", tmp_path / "m", limit=3)[1]) == 6
    assert [q.fields["round_id"] for q in _load("mmbench", tmp_path / "b", limit=2)[1]] == [0, 1, 2, 3, 0, 1]


def test_vqa_jsonl_questions_with_answers(tmp_path):
    path = tmp_path / "questions.jsonl"
    files.save_image(tmp_path / "images" / "x.jpg", 0)
    path.write_text(json.dumps({"question_id": 7, "image": "x.jpg", "question": "How many?",
                                "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8}) + "\n")
    bench, questions, root = _load("vqav2", tmp_path, lambda _: (path, []))
    assert root.endswith("images") and questions[0].truth == ["2"] * 2 + ["3"] * 8
    assert bench.score(questions, ["three"])["overall"]["accuracy"] == 1.0
