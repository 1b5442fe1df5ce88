"""svdkit's own zero-shot tasks, built from held-out text that ships with Python and its packages.

lm-evaluation-harness's tasks (ARC, PIQA, HellaSwag, LAMBADA...) load their data from the
Hugging Face hub; these are built on any machine from the evaluation domains of
:mod:`svdkit.data` (never from calibration text), deterministically for a seed:

``"next-sentence"``
    Two consecutive sentences of a document; choose the sentence that follows them among four:
    the true one and three other sentences of the same document, drawn among the eight closest
    to it in length (HellaSwag's form, with distractors that are real sentences on the same
    subject and about as long, so that neither ``acc`` nor ``acc_norm`` can win on length).
``"last-word"``
    Three consecutive sentences of a document, the last one without its final word; choose that
    word among four: the true one and three words that end other sentences of the same document
    (LAMBADA's target, as multiple choice; the result's ``exact_match`` is LAMBADA's greedy
    accuracy).

Items come from non-overlapping runs of consecutive prose sentences
(:func:`svdkit.data.sentence_runs`), shuffled per domain and taken from the domains in turn, so
that every domain weighs the same as far as its text allows. The right choice's position is
drawn at random (chance is 1/4).
"""

from __future__ import annotations

import random
import re
from typing import Callable, Sequence

from ..data import evaluation_documents, evaluation_domains, sentence_runs
from .items import MultipleChoiceItem, MultipleChoiceTask

__all__ = ["DEFAULT_ITEMS", "build_task", "task_names"]

DEFAULT_ITEMS = 200
_CHOICES = 4
_NEXT_CONTEXT = 2  # sentences before the one to choose
_NEAREST_LENGTHS = 8  # next-sentence distractors: drawn among this many sentences closest in length
_LAST_WORD_SENTENCES = 3  # sentences of a last-word passage, the target's included
_FINAL_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[.!?]?[\"'\u201d\u2019)\]]*$")

Runs = list[list[str]]


def _next_sentence(runs: Runs, source: str, rng: random.Random) -> list[MultipleChoiceItem]:
    pool = list(dict.fromkeys(sentence for run in runs for sentence in run))
    items = []
    for run in runs:
        for start in range(0, len(run) - _NEXT_CONTEXT, _NEXT_CONTEXT + 1):
            context, true = run[start:start + _NEXT_CONTEXT], run[start + _NEXT_CONTEXT]
            others = [s for s in pool if s != true and s not in context]
            if len(others) < _CHOICES - 1:
                continue
            # Distractors about as long as the true sentence: a sum of log-probabilities favours
            # short choices, and length alone must not give the answer away.
            nearest = sorted(others, key=lambda s: abs(len(s) - len(true)))[:_NEAREST_LENGTHS]
            choices = [true, *rng.sample(nearest, _CHOICES - 1)]
            rng.shuffle(choices)
            items.append(MultipleChoiceItem(" ".join(context), tuple(choices), choices.index(true), source))
    return items


def _last_word(runs: Runs, source: str, rng: random.Random) -> list[MultipleChoiceItem]:
    endings: dict[str, str] = {}  # lower case -> the word as first seen
    for run in runs:
        for sentence in run:
            match = _FINAL_WORD.match(sentence)
            if match:
                endings.setdefault(match.group(2).lower(), match.group(2))
    items = []
    for run in runs:
        for start in range(0, len(run) - _LAST_WORD_SENTENCES + 1, _LAST_WORD_SENTENCES):
            passage = run[start:start + _LAST_WORD_SENTENCES]
            match = _FINAL_WORD.match(passage[-1])
            if not match:
                continue
            head, word = match.groups()
            others = [w for key, w in endings.items() if key != word.lower()]
            if len(others) < _CHOICES - 1:
                continue
            choices = [word, *rng.sample(others, _CHOICES - 1)]
            rng.shuffle(choices)
            items.append(MultipleChoiceItem(" ".join([*passage[:-1], head]), tuple(choices), choices.index(word), source))
    return items


_TASKS: dict[str, tuple[str, Callable[[Runs, str, random.Random], list[MultipleChoiceItem]]]] = {
    "next-sentence": (f"the sentence that follows {_NEXT_CONTEXT} sentences, among {_CHOICES} of the same document and "
                      "about the same length", _next_sentence),
    "last-word": (f"the last word of {_LAST_WORD_SENTENCES} sentences, among {_CHOICES} words that end sentences of the same document", _last_word),
}


def task_names() -> tuple[str, ...]:
    """The names of svdkit's built-in tasks."""
    return tuple(_TASKS)


def build_task(name: str, *, n_items: int = DEFAULT_ITEMS, seed: int = 0, domains: Sequence[str] | None = None) -> MultipleChoiceTask:
    """Build one of svdkit's tasks (see the module docstring) from held-out text.

    Parameters
    ----------
    name : {"next-sentence", "last-word"}
    n_items : int
        How many items (the default, 200, gives a standard error of about 0.03 on an accuracy
        near 0.7).
    seed : int
        Seed of the sampling: the same seed gives the same items on every machine with the same
        Python and package versions.
    domains : sequence of str, optional
        Evaluation domains to draw from (default: all of :func:`svdkit.data.evaluation_domains`).

    Returns
    -------
    MultipleChoiceTask

    Raises
    ------
    ValueError
        An unknown task or domain name, or more items than the text gives (the message says
        how many it gives).
    """
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {list(_TASKS)}")
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items must be an int >= 1, got {n_items!r}")
    names = list(evaluation_domains()) if domains is None else list(domains)
    if not names:
        raise ValueError("domains is empty: give at least one evaluation domain")
    description, make = _TASKS[name]
    rng = random.Random(seed)
    per_domain = []
    for domain in names:
        items = [item for k, doc in enumerate(evaluation_documents(domain))
                 for item in make(sentence_runs(doc), f"{domain} document {k}", rng)]
        rng.shuffle(items)
        per_domain.append(items)
    available = sum(map(len, per_domain))
    if n_items > available:
        raise ValueError(f"the {name!r} task has {available} items in the domains {names}; ask for at most {available}")
    chosen: list[MultipleChoiceItem] = []
    turn = 0
    while len(chosen) < n_items:
        for items in per_domain:
            if turn < len(items) and len(chosen) < n_items:
                chosen.append(items[turn])
        turn += 1
    return MultipleChoiceTask(name, tuple(chosen), description=f"{description}; {n_items} items, seed {seed}, domains {', '.join(names)}")
