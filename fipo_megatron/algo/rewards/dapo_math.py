"""DAPO's rule-based math reward (``math_dapo`` in verl): +1 if the final answer matches, else -1.

The final answer is what follows the last "Answer:" (case-insensitive, to the end of that line), or,
with ``strict_box=True``, the last ``\\boxed{...}`` in the final 100 characters (compared verbatim, as
DAPO does). Both sides are normalised with the Minerva / lm-eval-harness rules DAPO uses, so e.g.
"Answer: $\\boxed{1,000}$ dollars" and "1000" agree. Only the last 300 characters of the response are
searched (DAPO's choice: answers are short, responses are 20k tokens).
"""

from __future__ import annotations

import re

from fipo_megatron.algo.rewards.base import register_reward

_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_SEARCH_CHARS = 300
_STRICT_BOX_CHARS = 100
INVALID = "[INVALID]"

# Normalisation tables of the Minerva paper's answer checker (as in lm-eval-harness / DAPO), applied in order.
_SUBSTITUTIONS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_REMOVED = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
            "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
            "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
            "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
            ",\\!", "{,}", '"', "\\dots")
_UNWRAP = (  # (pattern, replacement), applied in order
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), r"$\3$"),   # keep the first $...$ span
    (re.compile(r"(\\text\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\textbf\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\overline\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\boxed\{)(.*)(\})"), r"\2"),
    (re.compile(r"(frac)([^{])(.)"), r"frac{\2}{\3}"),  # \fracab -> \frac{a}{b}
    (re.compile(r"(sqrt)([^{])"), r"sqrt{\2}"),         # \sqrta -> \sqrt{a}
)


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{"):i]
    return None


def normalize_final_answer(answer: str) -> str:
    """Minerva normalisation: last '=' side, drop units/words/spaces, unwrap $, \\text, \\boxed, fix \\frac/\\sqrt."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED:
        answer = answer.replace(expr, "")
    for pattern, repl in _UNWRAP:
        answer = pattern.sub(repl, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # 100,000 -> 100000
        answer = answer.replace(",", "")
    return answer.strip()


def extract_answer(response: str, *, strict_box: bool = False) -> str:
    """The answer a response commits to ("[INVALID]" if none), before normalisation."""
    tail = response[-_SEARCH_CHARS:]
    if strict_box:
        boxed = last_boxed(tail[-_STRICT_BOX_CHARS:])
        return INVALID if boxed is None else boxed
    matches = _ANSWER_RE.findall(tail)
    return matches[-1] if matches else INVALID


@register_reward("dapo_math")
def dapo_math_reward(*, response_text: str, ground_truth: str, strict_box: bool = False,
                     ground_truth_boxed: bool = False, **_extra) -> dict:
    """``{"score": +1 / -1, "acc": correct, "pred": extracted answer}``, DAPO's rule.

    ``ground_truth_boxed``: the reference is a solution whose last ``\\boxed{}`` holds the answer.
    Other keyword arguments (``data_source``, ...) are accepted and ignored.
    """
    response = response_text
    if ground_truth_boxed:
        boxed = last_boxed(ground_truth)
        ground_truth = boxed if boxed is not None else ground_truth
    if strict_box:
        pred = extract_answer(response, strict_box=True)
        correct = pred == ground_truth
    else:
        pred = normalize_final_answer(extract_answer(response))
        correct = pred == normalize_final_answer(ground_truth)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
