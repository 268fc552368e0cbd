"""The reward tables of Exp.3 (SPEC.md section 4): +2 correct, -3 wrong, abstaining -3 (reward first) or 0
(reward second); a malformed output costs -6 on MMLU and -3 on TriviaQA."""
from __future__ import annotations

from common.tasks import CORRECT, IDK_CATEGORY, INCORRECT, MALFORMED

REWARDS = {
    "first": {CORRECT: 2.0, INCORRECT: -3.0, IDK_CATEGORY: -3.0},
    "second": {CORRECT: 2.0, INCORRECT: -3.0, IDK_CATEGORY: 0.0},
}
MALFORMED_REWARD = {"mmlu": -6.0, "triviaqa": -3.0}


def reward(category: str, reward_name: str, task: str) -> float:
    if category == MALFORMED:
        return MALFORMED_REWARD[task]
    return REWARDS[reward_name][category]
