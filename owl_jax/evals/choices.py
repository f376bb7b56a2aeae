"""Which option a multiple-choice answer names: VLMEvalKit's rule-based matching (MMBench, SEED-Bench).

`infer_option(answer, options)` ports VLMEvalKit's `can_infer` (vlmeval/utils/matching_util.py): first
`can_infer_option` — punctuation `.()[],:;!*#{}` turned into spaces, the words of the answer searched
for the option letters; exactly one letter found is the answer ("B", "(B) dog", "The answer is B.");
two or more ("A or B") is undecided; a refusal, or "Z" as a word and no letter, is "Z" (no option) —
then, when undecided, `can_infer_text`: exactly one option's text (lower case) inside the answer. The
official MMBench evaluation asks ChatGPT to match what both leave undecided; offline such an answer is
wrong (None). VLMEvalKit's guard against the article "A" applies only with VERBOSE set; not ported.
"""

from __future__ import annotations

from typing import Mapping

_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def infer_letter(answer: str, letters) -> str | None:
    """The one option letter among `letters` that the answer's words contain, "Z" for a refusal, else None."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in _REFUSALS):
        return "Z"
    for c in ".()[],:;!*#{}":
        answer = answer.replace(c, " ")
    words = answer.split()
    found = [letter for letter in letters if letter in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return "Z"
    return None


def infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    """The letter of the one option whose text the answer contains (case-insensitive), else None."""
    answer = answer.lower()
    found = [letter for letter, text in options.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def infer_option(answer: str, options: Mapping[str, str]) -> str | None:
    """The letter (a key of `options`, or "Z") the answer names, or None (undecided)."""
    return infer_letter(answer, options) or infer_text(answer, options)
