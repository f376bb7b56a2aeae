"""The standard VQA answer normalisation, and the VQA accuracy built on it.

A port of the EvalAI answer processor that the VQAv2 server applies to submissions and that TextVQA's
evaluator (mmf's `m4c_evaluator.TextVQAAccuracyEvaluator`, which LLaVA's `eval_textvqa.py` uses) applies
to predictions and ground truths alike. Ported rule for rule, quirks included, because the quirks move
scores: "Two dogs." and "2 dogs" are the same answer, "the dog" and "dog" too, "dont" and "don't" too.

1. lower case; "," and "?" removed; "'s" split off ("man's" -> "man 's"); line breaks and tabs to spaces
2. punctuation (`PUNCTUATIONS`): removed when the text has it next to a space or has a comma between
   digits (the official rule looks at the whole answer), otherwise replaced by a space; then "." removed
   unless it is followed by a digit ("3.5" stays). The official period regex has a typo (`(?!<=\\d)`
   instead of a look-behind), and it is called with `re.UNICODE` in the `count` position, so at most 32
   periods go; both kept.
3. number words zero..ten (and "none") to digits, articles (a, an, the) dropped, contractions missing
   their apostrophe restored ("dont" -> "don't").
"""

from __future__ import annotations

import re
from typing import Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic (see the module docstring)
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _punctuation(text: str) -> str:
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATIONS:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)  # sic: the official call passes re.UNICODE as count


def _digits_articles(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The EvalAI-processed form of an answer: `normalize_answer("Two dogs.") == "2 dogs"`."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction against the human answers (10 in VQAv2 and TextVQA): the mean,
    over leaving each human answer out, of min(1, matches among the others / 3), everything normalised.
    With 10 answers: 3 or more matches score 1, 2 score 0.6, 1 scores 0.3."""
    if not answers:
        raise ValueError("no ground-truth answers")
    pred = normalize_answer(prediction)
    truth = [normalize_answer(a) for a in answers]
    matches = sum(t == pred for t in truth)
    # leaving out a matching answer leaves matches - 1 others, leaving out another one leaves matches
    total = matches * min(1.0, (matches - 1) / 3) + (len(truth) - matches) * min(1.0, matches / 3)
    return total / len(truth)
