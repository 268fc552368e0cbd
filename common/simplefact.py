"""SimpleFact (SPEC.md section 7, `shared/seeds/simplefact_notes.md`): the response format, the four response
classes, the group-conditional reward in its four round-2 settings, the data-filtering score and the 5-way
evaluation decomposition. The algorithm that optimises the reward is `common.rl.grpo`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from common import tasks

# The notes' system prompt, verbatim in meaning (paper scale: the chat template's system message).
SYSTEM_PROMPT = ("A conversation between User and Assistant. The Assistant must think step by step. Then give a "
                 "brief answer in \\boxed{} if sure about the answer, otherwise the Assistant can return "
                 "\\boxed{Unknown} if not sure.")
UNKNOWN = "Unknown"

CORRECT, PROCESS_CORRECT, NOT_ATTEMPT, WRONG = "correct", "process_correct", "not_attempt", "wrong"
CLASSES = (CORRECT, PROCESS_CORRECT, NOT_ATTEMPT, WRONG)
PROCESS_READINGS = ("retrieved", "format")  # SPEC.md 7.2: the primary reading, and the format-credit alternative
SETTINGS = ("fact", "caution", "both", "fact-then-caution")
DECOMPOSITION = ("All Correct", "Partial Correct", "Partial NotAttempt", "All NotAttempt",
                 "All Attempt and Wrong")  # SPEC.md 7.6; the notes' table orders its columns differently


# ---------------------------------------------------------------------------------------------------------------
# Responses and their classes

_BOX = "\\boxed{"
_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{(.*)\}$")


def last_boxed(response: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced, so "\\boxed{\\text{Paris}}" as Qwen writes it
    reads "Paris"), or None when the response has none or it is never closed."""
    start = response.rfind(_BOX)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOX)
    for j in range(i, len(response)):
        depth += {"{": 1, "}": -1}.get(response[j], 0)
        if depth == 0:
            content = response[i:j].strip()
            while (m := _WRAPPER.match(content)) is not None:
                content = m.group(1).strip()
            return content
    return None


def synthetic_response(candidates: Sequence[str], answer: str | None) -> str:
    """The synthetic scale's response: the candidate answers the model considers (its short reasoning), then the
    box: "Candidates: Paris, Rome. \\boxed{ Paris}" ("Unknown" when `answer` is None). The space inside the box
    makes the answer the world's word token " Paris", whose output row pretraining trained; "{Paris}" would be a
    piece no document ever ends a word with."""
    return f"Candidates: {', '.join(candidates)}. \\boxed{{ {UNKNOWN if answer is None else answer}}}"


def classify(response: str, question: tasks.QAQuestion, process_reading: str = "retrieved") -> str:
    """One response's class (SPEC.md 7.2). Correct: the last box matches the gold answer or an alias (SQuAD
    normalisation). Not-attempt: the last box says Unknown. Process-correct, read as `process_reading`:
    "retrieved" (primary) when the gold answer appears in the reasoning before a box that is not correct (an
    Unknown box included); "format" when the box is a well-formed attempt that is wrong. Wrong: everything else,
    a missing box included, so a format failure is never rewarded."""
    if process_reading not in PROCESS_READINGS:
        raise ValueError(f"unknown process-correct reading {process_reading!r}; expected one of {PROCESS_READINGS}")
    text = tasks.strip_eos(response)
    boxed = last_boxed(text)
    if boxed is None:
        return WRONG
    gold = (question.value, *question.aliases)
    if question.value and tasks.matches_gold(boxed, gold):
        return CORRECT
    if process_reading == "retrieved" and question.value:
        reasoning = tasks.normalize_answer(text[: text.rfind("\\boxed")])
        if any(f" {tasks.normalize_answer(g)} " in f" {reasoning} " for g in gold if tasks.normalize_answer(g)):
            return PROCESS_CORRECT
    if boxed.lower() == UNKNOWN.lower():
        return NOT_ATTEMPT
    return PROCESS_CORRECT if process_reading == "format" else WRONG


# ---------------------------------------------------------------------------------------------------------------
# The group-conditional reward (SPEC.md 7.3)

FACT_REWARD = {CORRECT: 1.0, PROCESS_CORRECT: 0.5, NOT_ATTEMPT: 0.0, WRONG: 0.0}
CAUTION_REWARD = {CORRECT: 0.0, PROCESS_CORRECT: 0.0, NOT_ATTEMPT: 1.0, WRONG: 0.0}


def group_reward(classes: Sequence[str], setting: str = "both") -> list[float]:
    """Rewards for a group of responses to one question, from their classes. The fact reward applies when some
    response of the group is correct (correct 1, process-correct 0.5, others 0); the caution reward when none is
    (not-attempt 1, others 0). The branches are disjoint, so "both" (their sum) is the round-1 reward; "fact" and
    "caution" keep one branch and give 0 in the other. "fact-then-caution" is a schedule: the caller passes the
    phase's setting (`setting_at`)."""
    if setting not in ("fact", "caution", "both"):
        raise ValueError(f"unknown reward setting {setting!r}; expected fact, caution or both")
    any_correct = CORRECT in classes
    if any_correct and setting in ("fact", "both"):
        return [FACT_REWARD[c] for c in classes]
    if not any_correct and setting in ("caution", "both"):
        return [CAUTION_REWARD[c] for c in classes]
    return [0.0] * len(classes)


def setting_at(setting: str, step: int, total_steps: int) -> str:
    """The reward in force at a rollout step: "fact-then-caution" is fact-only for the first half of the budget,
    then caution-only ([PROPOSED] in SPEC.md 7.3); the other settings do not change."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown reward setting {setting!r}; expected one of {SETTINGS}")
    if setting == "fact-then-caution":
        return "fact" if step < total_steps // 2 else "caution"
    return setting


# ---------------------------------------------------------------------------------------------------------------
# Data filtering (SPEC.md 7.5) and the evaluation decomposition (SPEC.md 7.6)

FILTER_SCORES = ("correctness", "reward")


def variability(classes: Sequence[str], score: str = "correctness") -> tuple[float, float]:
    """How varied a question's sampled outcomes are, then (tie-break) the entropy of the correct / not-attempt /
    other distribution. "correctness" is SPEC.md 7.5's proposal, p(1 - p) with p the share correct, meant to drop
    groups whose rewards would all be equal; "reward" is the variance of the group reward itself (setting both),
    which does that in both branches of the reward. p(1 - p) ranks every question no sample answers correctly
    last, so a filtered set may never show GRPO the caution branch (measured at synthetic scale, seed 0: the
    setting-both policy's not-attempt rate stayed at 0.03-0.07 over 60 steps), hence "reward" there."""
    if score not in FILTER_SCORES:
        raise ValueError(f"unknown filtering score {score!r}; expected one of {FILTER_SCORES}")
    n = len(classes)
    shares = np.array([sum(c == CORRECT for c in classes) / n, sum(c == NOT_ATTEMPT for c in classes) / n])
    primary = shares[0] * (1 - shares[0]) if score == "correctness" else float(np.var(group_reward(classes)))
    shares = np.append(shares, 1 - shares.sum())
    shares = shares[shares > 0]
    return float(primary), float(-(shares * np.log(shares)).sum())


def most_varied(per_question: Sequence[Sequence[str]], n: int, score: str = "correctness") -> list[int]:
    """Indices of the n questions with the most varied outcomes (SPEC.md 7.5), most varied first; ties keep the
    questions' order."""
    scores = [variability(c, score) for c in per_question]
    return sorted(range(len(scores)), key=lambda i: (-scores[i][0], -scores[i][1], i))[:n]


@dataclass(frozen=True)
class Outcome:
    correct: int
    not_attempt: int
    other: int  # wrong and process-correct responses


def outcome(classes: Sequence[str]) -> Outcome:
    c = sum(x == CORRECT for x in classes)
    u = sum(x == NOT_ATTEMPT for x in classes)
    return Outcome(c, u, len(classes) - c - u)


def decomposition_class(o: Outcome) -> str:
    """A question's column of the 5-way decomposition: decided by the correct count first, then not-attempt."""
    k = o.correct + o.not_attempt + o.other
    if o.correct == k:
        return "All Correct"
    if o.correct > 0:
        return "Partial Correct"
    if o.not_attempt == k:
        return "All NotAttempt"
    if o.not_attempt == 0:
        return "All Attempt and Wrong"
    return "Partial NotAttempt"


def decomposition(per_question: Sequence[Sequence[str]]) -> dict[str, float]:
    """Percent of questions in each of the five columns (they sum to 100)."""
    counts = dict.fromkeys(DECOMPOSITION, 0)
    for classes in per_question:
        counts[decomposition_class(outcome(classes))] += 1
    return {k: 100.0 * v / len(per_question) for k, v in counts.items()}
