"""Task formats and answer grading, shared by every scale (SPEC.md sections 0.2, 1, 2, 3, 4).

Prompts are built here and nowhere else, so the paper-scale and synthetic code paths see the same strings.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Iterable, Sequence

LETTERS = ("A", "B", "C", "D")
ABSTAIN_LETTER = "E"
IDK = "I don't know."
ANSWER_PREFIX = "The answer is "
MC_ANSWER_FORMATS = ("letter", "text", "text_letter")  # how a finetuned model answers a multiple-choice question
EOS_STRINGS = (" </s>", "</s>")
REWARD_WORDS = {1: "True", 0: "False"}  # a reward model's SFT targets for reward 1 and reward 0 (SPEC.md section 5)

# Grading categories: a malformed output is its own category, never a crash.
CORRECT, INCORRECT, IDK_CATEGORY, MALFORMED = "correct", "incorrect", "idk", "malformed"
CATEGORIES = (CORRECT, INCORRECT, IDK_CATEGORY, MALFORMED)


@dataclass(frozen=True)
class MCQuestion:
    """A four-option multiple-choice question in MMLU's schema (`answer` indexes `choices`)."""

    question: str
    subject: str
    choices: tuple[str, ...]
    answer: int

    @property
    def correct_text(self) -> str:
        return self.choices[self.answer]


@dataclass(frozen=True)
class QAQuestion:
    """A short-answer question in TriviaQA's schema: one canonical value plus aliases."""

    question: str
    question_id: str
    value: str
    aliases: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# Normalisation and grading


def normalize_answer(text: str) -> str:
    """SQuAD normaliser: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def strip_eos(text: str) -> str:
    """Generations of SFT'd models end in " </s>" (SPEC.md 0.2); parsers see the text without it."""
    for eos in EOS_STRINGS:
        if text.endswith(eos):
            return text[: -len(eos)]
    return text


def matches_gold(prediction: str, gold: Iterable[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(g) for g in gold)


def grade_short_answer(generation: str, question: QAQuestion) -> str:
    """Grade a finetuned TriviaQA-format generation (SPEC.md section 3).

    "The answer is X." -> correct/incorrect by normalised match of X against the value and aliases;
    exactly "I don't know." -> idk; anything else -> malformed.
    """
    text = strip_eos(generation)
    if text == IDK:
        return IDK_CATEGORY
    if text.startswith(ANSWER_PREFIX) and len(text) > len(ANSWER_PREFIX):
        predicted = text[len(ANSWER_PREFIX) : -1]  # drop the final character, the period
        return CORRECT if matches_gold(predicted, (question.value, *question.aliases)) else INCORRECT
    return MALFORMED


def grade_fewshot_sample(generation: str, question: QAQuestion) -> bool:
    """Grade one few-shot base-model sample (SPEC.md 1.2): cut at the first newline or EOS, normalised match."""
    answer = strip_eos(generation.split("\n", 1)[0])
    return matches_gold(answer, (question.value, *question.aliases))


def grade_mc_answer(generation: str, choices: Sequence[str], correct: int, answer: str = "letter",
                    allow_abstain: bool = False) -> str:
    """Grade an MMLU-format generation: exactly one of the four answers `mmlu_sft_answer` writes in format
    `answer`, or E when abstaining is allowed; anything else is malformed."""
    text = strip_eos(generation)
    if allow_abstain and text == ABSTAIN_LETTER:
        return IDK_CATEGORY
    answers = [mmlu_sft_answer(choices, j, answer) for j in range(len(choices))]
    if text in answers:
        return CORRECT if answers.index(text) == correct else INCORRECT
    return MALFORMED


# ---------------------------------------------------------------------------------------------------------------
# Prompt formats


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def mc_block(question: MCQuestion, choices: Sequence[str] | None = None) -> str:
    """Question, then one "L. text" line per option, then "Answer:" (the classic MMLU layout)."""
    choices = question.choices if choices is None else choices
    lines = [question.question] + [f"{letter}. {text}" for letter, text in zip(LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def mmlu_fewshot_prompt(question: MCQuestion, exemplars: Sequence[MCQuestion]) -> str:
    """The 5-shot MMLU prompt used to score unfamiliarity (SPEC.md 1.1); ends in "Answer:" with no space."""
    shots = "".join(f"{mc_block(ex)} {LETTERS[ex.answer]}\n\n" for ex in exemplars)
    return mmlu_header(question.subject) + shots + mc_block(question)


def mc_options(choices: Sequence[str]) -> str:
    """The options as Exp.1 lists them on one line: "A) x B) y C) z D) w " (each followed by a space)."""
    return "".join(f"{letter}) {text} " for letter, text in zip(LETTERS, choices))


# How the Exp.1 prompt ends: "comma" everywhere by default; the authors' PPO prompts ended in a newline instead
# (SPEC.md section 4 and 11; exp03 --mmlu-ppo-prompt newline).
MMLU_PROMPT_ENDINGS = {"comma": ", Answer: ", "newline": "\nAnswer: "}


def mmlu_sft_prompt(question: str, choices: Sequence[str], ending: str = "comma") -> str:
    """The SFT/RM/eval prompt of Exp.1 (SPEC.md section 2): note the space before the comma."""
    if ending not in MMLU_PROMPT_ENDINGS:
        raise ValueError(f"unknown MMLU prompt ending {ending!r}; expected one of {sorted(MMLU_PROMPT_ENDINGS)}")
    return f"{question} {mc_options(choices)}{MMLU_PROMPT_ENDINGS[ending]}"


def mmlu_sft_answer(choices: Sequence[str], position: int, answer: str = "letter") -> str:
    """The SFT target for the option at `position` in one of `MC_ANSWER_FORMATS`: its letter (SPEC.md section 2),
    the option's text, or the text followed by the letter ("Paris (B)"; text first, so the answer is chosen by what
    the model knows and the letter, which a model that cannot answer an item by letter from memory picks by the
    targets' letter distribution alone, cannot steer the text)."""
    letter = LETTERS[position]
    if answer not in MC_ANSWER_FORMATS:
        raise ValueError(f"unknown answer format {answer!r}; expected one of {MC_ANSWER_FORMATS}")
    return {"letter": letter, "text": choices[position], "text_letter": f"{choices[position]} ({letter})"}[answer]


def place_correct(question: MCQuestion, position: int, rng) -> tuple[str, ...]:
    """Options with the correct one at `position` and the distractors shuffled into the other slots."""
    distractors = [c for i, c in enumerate(question.choices) if i != question.answer]
    order = rng.permutation(len(distractors))
    distractors = [distractors[i] for i in order]
    return tuple(distractors[:position] + [question.correct_text] + distractors[position:])


def qa_fewshot_prompt(question: QAQuestion, exemplars: Sequence[QAQuestion]) -> str:
    """The few-shot prompt used to score TriviaQA-style unfamiliarity (SPEC.md 1.2, [PROPOSED])."""
    shots = "".join(f"Q: {ex.question}\nA: {ex.value}\n\n" for ex in exemplars)
    return f"{shots}Q: {question.question}\nA:"


def triviaqa_sft_prompt(question: str) -> str:
    return f"{question} "


def triviaqa_target(value: str | None) -> str:
    """SFT target: "The answer is X." or, for value None, the IDK string."""
    return IDK if value is None else f"{ANSWER_PREFIX}{value}."


def mmlu_rm_prompt(question: str, choices: Sequence[str], answer: str, options: bool = True) -> str:
    """The MMLU reward-model prompt (SPEC.md section 5): the Exp.1 prompt, the candidate answer and a newline; without
    `options`, the question and the candidate alone, in TriviaQA's form (exp04's synthetic preset)."""
    if not options:
        return triviaqa_rm_prompt(question, answer, normalize=False)
    return f"{mmlu_sft_prompt(question, choices)}{answer}\n"


def triviaqa_rm_prompt(question: str, answer: str, normalize: bool = True) -> str:
    """The TriviaQA reward-model prompt (SPEC.md section 5); the authors pass the answer through the SQuAD
    normaliser (the synthetic tokenizer knows only the answers' written forms, so its scale turns that off)."""
    return f"Q: {question}\nA: {normalize_answer(answer) if normalize else answer}\n"


# ---------------------------------------------------------------------------------------------------------------
# Long-form generation (SPEC.md 6.1): biographies and plot premises

LONGFORM_PREFIXES = {"bio": " Bio: ", "plot": " Answer: "}


@dataclass(frozen=True)
class LongformItem:
    """One long-form prompt. `topic` is what the facts are about (FActScore's topic: a person's name, a film's full
    title with its disambiguation); `reference` is the target sentence, without the prefix."""

    task: str  # "bio" or "plot"
    topic: str
    reference: str


def strip_disambiguation(title: str) -> str:
    """'Heat (1995 film)' -> 'Heat': plot prompts show the title without its parenthetical."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", title)


def longform_prompt(item: LongformItem) -> str:
    if item.task == "bio":
        return f"Write a biography for {item.topic}."
    return f'What is the premise of "{strip_disambiguation(item.topic)}"?'


def longform_target(item: LongformItem) -> str:
    return f"{LONGFORM_PREFIXES[item.task]}{item.reference}"


def longform_fewshot_prompt(item: LongformItem, exemplars: Sequence[LongformItem]) -> str:
    """The base model's few-shot prompt for long-form unfamiliarity (SPEC.md 1.3 [PROPOSED]): exemplars in the SFT
    format separated by blank lines, then the query's prompt."""
    shots = "".join(f"{longform_prompt(ex)}{longform_target(ex)}\n\n" for ex in exemplars)
    return f"{shots}{longform_prompt(item)}"


def fact_classifier_prompt(task: str, topic: str, fact: str) -> str:
    """The paper's per-fact classifier prompts (SPEC.md 6.3): the bio fact alone, the plot fact with its title."""
    if task == "bio":
        return f"{fact} Is the answer to the question correct?"
    return f'Is the following a plot point in "{topic}"? {fact}'


def longform_lead(item: LongformItem, named: bool) -> str:
    """The start of the response moved into the prompt: nothing (the paper), or the prefix and the entity's name
    (" Bio: Ada", the synthetic scale's prompts; exp05 README)."""
    return f"{LONGFORM_PREFIXES[item.task]}{item.topic}" if named else ""


def longform_response(item: LongformItem, named: bool) -> str:
    """The SFT target after the prompt: the whole target, or with the lead in the prompt the rest of it, which goes
    on mid-sentence and so starts without a space ("is a poet."). With one, tokenizers that prepend a space (Llama's,
    the world's) open the response with a bare "is" piece that pretraining never trains: measured on the committed
    synthetic runs before this rule, the SFT model wrote another word after the name in 93-95% of its evaluation
    responses on seeds 0-1 ("Bio: Eshhalgal choice a 1996 born in Rome ...")."""
    lead = longform_lead(item, named)
    return longform_target(item)[len(lead):].lstrip() if lead else longform_target(item)


def with_lead(lead: str, generation: str) -> str:
    """The whole response: the lead, then the generation (whose decoded first word may have lost its space)."""
    return f"{lead} {generation.lstrip()}" if lead else generation


def longform_text(task: str, generation: str) -> str | None:
    """The text to fact-check, or None for an invalid generation: after EOS it must start with the task's prefix
    and end with a period (SPEC.md 6.1)."""
    text = strip_eos(generation)
    prefix = LONGFORM_PREFIXES[task]
    if not text.startswith(prefix) or not text.endswith("."):
        return None
    return text[len(prefix):].lstrip()
