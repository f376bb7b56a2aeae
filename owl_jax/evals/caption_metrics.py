"""COCO caption metrics: the PTB tokenizer, BLEU-1..4 and CIDEr-D, as pycocoevalcap computes them.

`bleu` and `cider_d` are line-for-line ports of pycocoevalcap's `BleuScorer` (corpus BLEU, "closest"
reference length, its 1e-9 / 1e-15 smoothing) and `CiderScorer` (CIDEr-D: tf-idf over the n-grams of the
evaluated images' references, clipped counts, a Gaussian length penalty with sigma 6, ×10) — quirks
included (CIDEr-D's length is the hypothesis's number of *bigrams*, as in the original). Ported so that
scoring needs no dependency; tests/test_benchmarks.py checks them against pycocoevalcap itself.

Tokenisation decides much of the score. `ptb_tokenize` runs Stanford's PTBTokenizer as pycocoevalcap
does (`java -cp stanford-corenlp-3.4.1.jar ... -preserveLines -lowerCase`, then its punctuation list
removed) with the jar of an installed pycocoevalcap (`pip install -e ".[eval]"`) and `java` on the PATH.
`python_tokenize` is the fallback: a pure-Python approximation of the same rules (lower case; quotes,
commas, periods, colons, semicolons, ! ? - -- ... removed; n't / 's / 're / 've / 'll / 'm / 'd split
off; ( ) [ ] { } kept as -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-, as pycocoevalcap keeps them because its
list is upper case; $ % # split off; hyphenated words, decimals, "1,000" and abbreviations kept). On
the 400 COCO captions of LLaVA's `caps_boxes_coco2014_val_80.jsonl` it tokenises every caption as the
Java tokenizer does, and BLEU-4 / CIDEr-D agree to 1e-12 (docs/evaluation.md).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from typing import Mapping, Sequence

#: pycocoevalcap's tokens removed after tokenising (upper-case brackets never match: -lowerCase).
PTB_PUNCTUATIONS = ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                    "...", ";")


# ---------------------------------------------------------------------- tokenizers


def ptb_jar() -> str | None:
    """The Stanford CoreNLP jar of an installed pycocoevalcap, when `java` can run it."""
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError:
        return None
    jar = os.path.join(os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)
    return jar if os.path.isfile(jar) and shutil.which("java") else None


def ptb_tokenize(captions: Sequence[str], jar: str) -> list[str]:
    """pycocoevalcap's PTBTokenizer on `captions` (a temporary file in the system's temp folder, not in
    the package's own folder as pycocoevalcap does). RuntimeError when java fails."""
    fd, path = tempfile.mkstemp(prefix="ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(c.replace("\n", " ") for c in captions))
        done = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", path], capture_output=True)
    finally:
        os.unlink(path)
    if done.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer (java) failed: {done.stderr.decode(errors='replace').strip()[:200]}")
    lines = done.stdout.decode("utf-8").split("\n")
    if len(lines) < len(captions):
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS)
            for line in lines[:len(captions)]]


_SPLIT_FIRST = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
                "lemme": ["lem", "me"], "gimme": ["gim", "me"], "'tis": ["'t", "is"], "'twas": ["'t", "was"],
                "y'all": ["y'", "all"]}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
#: Abbreviations whose period the PTB lexer keeps (its common ones; "no." only before a number).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st ave blvd rd mt ft jr sr prof gen gov sen rep rev capt col lt sgt co corp inc ltd bros etc vs "
    "jan feb mar apr jun jul aug sep sept oct nov dec calif mass conn fla ill ind mich minn penn tenn tex wash "
    "wis ariz colo ore okla".split())
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'m", "'d")
_LEADING = "\"'`([{$#"
_TRAILING = "\"')]},;:%"
#: Tokens pycocoevalcap removes, as they come out of the lower-casing tokenizer (quotes become `` and '').
_REMOVE = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}


def _keeps_period(word: str, last: bool, next_word: str) -> bool:
    """Whether the PTB lexer keeps the final period of `word` as part of it."""
    stem = word[:-1]
    if re.fullmatch(r"([a-z]\.)+[a-z]", stem):  # u.s., p.m., e.g.
        return True
    if re.fullmatch(r"[a-z]", stem):  # a single letter: an initial, except at the end of the line
        return not last
    if stem == "no":
        return next_word[:1].isdigit()
    return stem in _ABBREVIATIONS


def _split_chunk(chunk: str, last: bool, next_word: str) -> list[str]:
    """The tokens of one whitespace-separated piece of a caption."""
    if chunk in _SPLIT_FIRST:
        return list(_SPLIT_FIRST[chunk])
    head: list[str] = []
    tail: list[str] = []
    while chunk and chunk[0] in _LEADING and not re.match(r"'(\d|n'|t\b)", chunk):
        head.append(_BRACKETS.get(chunk[0], chunk[0]))
        chunk = chunk[1:]
    while chunk:
        m = re.search(r"(\.\.\.+|[?!]+|--+)$", chunk)
        if m and m.start() > 0 or m and m.group() != chunk:
            tail.insert(0, m.group())
            chunk = chunk[:m.start()]
        elif chunk[-1] in _TRAILING and len(chunk) > 1 and not (chunk[-1] == "'" and chunk.endswith("n'")):
            tail.insert(0, _BRACKETS.get(chunk[-1], chunk[-1]))
            chunk = chunk[:-1]
        elif chunk.endswith(".") and len(chunk) > 1 and not _keeps_period(chunk, last and not tail, next_word):
            tail.insert(0, ".")
            chunk = chunk[:-1]
        elif chunk.endswith("-") and len(chunk) > 1 and not chunk.endswith("--"):
            tail.insert(0, "-")
            chunk = chunk[:-1]
        else:
            break
    if chunk in _BRACKETS:
        chunk = _BRACKETS[chunk]
    middle: list[str] = []
    for piece in re.split(r"(&|--+|(?<!\d),|,(?!\d))", chunk):
        clitics: list[str] = []
        while piece != "o'clock":  # "shouldn't've" -> should n't 've
            clitic = next((c for c in _CLITICS if piece.endswith(c) and len(piece) > len(c)), None)
            if clitic is None:
                break
            piece, clitics = piece[:-len(clitic)], [clitic, *clitics]
        middle += [p for p in (piece, *clitics) if p]
    return head + middle + tail


def python_tokenize(caption: str) -> str:
    """A pure-Python approximation of pycocoevalcap's PTB tokenisation (see the module docstring)."""
    text = caption.replace("\n", " ").lower()
    text = text.translate({0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"'})
    text = re.sub(r"(\d) (\d+/\d+)\b", "\\1\xa0\\2", text)  # "10 1/2" is one token, joined by a no-break space
    chunks = text.split(" ")
    chunks = [c for c in chunks if c]
    words: list[str] = []
    for i, chunk in enumerate(chunks):
        words += _split_chunk(chunk, i == len(chunks) - 1, chunks[i + 1] if i + 1 < len(chunks) else "")
    return " ".join(w for w in words if w and w not in _REMOVE)


def tokenize(captions: Sequence[str], mode: str = "auto") -> tuple[list[str], str]:
    """(tokenised captions, the tokenizer used: "ptb" or "python"). `mode` auto uses PTB when available."""
    if mode not in ("auto", "ptb", "python"):
        raise ValueError(f"unknown caption tokenizer {mode!r} (auto, ptb, python)")
    jar = ptb_jar() if mode in ("auto", "ptb") else None
    if mode == "ptb" and jar is None:
        raise ValueError("--caption-tokenizer ptb needs pycocoevalcap (pip install -e '.[eval]') and java on the PATH")
    if jar is not None:
        try:
            return ptb_tokenize(captions, jar), "ptb"
        except (RuntimeError, OSError) as e:
            if mode == "ptb":
                raise ValueError(str(e)) from None
    return [python_tokenize(c) for c in captions], "python"


# ---------------------------------------------------------------------- scorers


def _ngrams(words: Sequence[str], n: int = 4) -> dict[tuple, int]:
    counts: dict[tuple, int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def bleu(hypotheses: Mapping, references: Mapping, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of {id: tokenised caption} against {id: [tokenised references]} (pycocoevalcap)."""
    small, tiny = 1e-9, 1e-15
    testlen = reflen = 0
    guess, correct = [0] * n, [0] * n
    for key, hyp in hypotheses.items():
        words = hyp.split()
        counts = _ngrams(words, n)
        maxcounts: dict[tuple, int] = {}
        lengths = []
        for ref in references[key]:
            ref_words = ref.split()
            lengths.append(len(ref_words))
            for gram, c in _ngrams(ref_words, n).items():
                maxcounts[gram] = max(maxcounts.get(gram, 0), c)
        reflen += min((abs(length - len(words)), length) for length in lengths)[1]  # Bleu: option="closest"
        testlen += len(words)
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(maxcounts.get(gram, 0), c)
    scores, product = [], 1.0
    for k in range(n):
        product *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(hypotheses: Mapping, references: Mapping, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D of {id: tokenised caption} against {id: [tokenised references]} (pycocoevalcap's Cider)."""
    keys = list(hypotheses)
    refs = [[_ngrams(r.split(), n) for r in references[k]] for k in keys]
    tests = [_ngrams(hypotheses[k].split(), n) for k in keys]
    df: dict[tuple, float] = defaultdict(float)
    for image_refs in refs:
        for gram in {g for r in image_refs for g in r}:
            df[gram] += 1
    log_n = math.log(float(len(refs)))

    def vector(counts):
        vec = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_n - math.log(max(1.0, df[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:  # sic: pycocoevalcap counts bigrams as the length
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for test, image_refs in zip(tests, refs):
        vec, norm, length = vector(test)
        total = [0.0] * n
        for ref in image_refs:
            vec_r, norm_r, length_r = vector(ref)
            delta = float(length - length_r)
            for k in range(n):
                val = sum(min(v, vec_r[k][g]) * vec_r[k][g] for g, v in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * math.e ** (-(delta ** 2) / (2 * sigma ** 2))
        scores.append(sum(total) / n / len(image_refs) * 10.0)
    return sum(scores) / len(scores)
