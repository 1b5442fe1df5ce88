"""Multiple-choice items and tasks: what a zero-shot task is, checked, and read from or written to JSON lines.

An item is a context and its choices, one of them the target. A model scores a choice by the
log-likelihood of ``target_delimiter + choice`` after the context, as lm-evaluation-harness does
for its ``multiple_choice`` tasks (ARC, PIQA, HellaSwag...).

A task file holds one JSON object per line: ``{"context": str, "choices": [str, ...], "target":
int}`` and, optionally, ``"source"`` (where the item comes from). The same file is the data of the
lm-eval task that :func:`svdkit.tasks.export_lm_eval` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["MultipleChoiceItem", "MultipleChoiceTask", "load_task", "save_task"]


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: a context, two or more choices, the index of the right one.

    Attributes
    ----------
    context : str
        The text the choices continue (not empty).
    choices : tuple of str
        At least two distinct, non-empty continuations (without the delimiter).
    target : int
        Index of the right choice in ``choices``.
    source : str
        Where the item comes from (a domain and document), for the reader.
    """

    context: str
    choices: tuple[str, ...]
    target: int
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.context, str) or not self.context.strip():
            raise ValueError(f"the context must be a non-empty string, got {self.context!r}")
        if isinstance(self.choices, (str, bytes)) or not isinstance(self.choices, Sequence):
            raise ValueError(f"choices must be a list of strings, got {type(self.choices).__name__}")
        object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 2:
            raise ValueError(f"an item needs at least two choices, got {len(self.choices)}: {list(self.choices)!r}")
        for j, choice in enumerate(self.choices):
            if not isinstance(choice, str) or not choice.strip():
                raise ValueError(f"choice {j} must be a non-empty string, got {choice!r}")
        if len(set(self.choices)) < len(self.choices):
            raise ValueError(f"the choices repeat one another: {list(self.choices)!r}")
        if isinstance(self.target, bool) or not isinstance(self.target, int):
            raise ValueError(f"target must be the index (an int) of the right choice, got {self.target!r}")
        if not 0 <= self.target < len(self.choices):
            raise ValueError(f"target {self.target} is out of range for {len(self.choices)} choices (0 to {len(self.choices) - 1})")

    def to_dict(self) -> dict[str, Any]:
        return {"context": self.context, "choices": list(self.choices), "target": self.target, "source": self.source}


@dataclass(frozen=True)
class MultipleChoiceTask:
    """A named list of :class:`MultipleChoiceItem`.

    Attributes
    ----------
    name : str
    items : tuple of MultipleChoiceItem
        At least one.
    description : str
        How the items were made.
    target_delimiter : str
        Put between the context and each choice (lm-eval's default, one space).
    """

    name: str
    items: tuple[MultipleChoiceItem, ...]
    description: str = ""
    target_delimiter: str = " "

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a task needs a non-empty name, got {self.name!r}")
        object.__setattr__(self, "items", tuple(self.items))
        if not self.items:
            raise ValueError(f"task {self.name!r} has no items")
        for i, item in enumerate(self.items):
            if not isinstance(item, MultipleChoiceItem):
                raise ValueError(f"item {i} of task {self.name!r} is a {type(item).__name__}, not a MultipleChoiceItem")

    def __len__(self) -> int:
        return len(self.items)


def save_task(task: MultipleChoiceTask, path: str | Path) -> Path:
    """Write the items of ``task`` as JSON lines (see the module docstring); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for item in task.items:
            out.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
    return path


def load_task(path: str | Path, *, name: str | None = None) -> MultipleChoiceTask:
    """Read a task file (JSON lines, see the module docstring).

    Parameters
    ----------
    path : str or Path
    name : str, optional
        The task's name; defaults to the file's stem.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A line that is not a JSON object with ``context``, ``choices`` and ``target``, an item
        with fewer than two choices, a target out of range...: the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {str(path)!r} (a JSON-lines file of {{'context', 'choices', 'target'}} objects)")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON: {exc}") from exc
        if not isinstance(record, dict) or not {"context", "choices", "target"} <= set(record):
            raise ValueError(f"{where} must be a JSON object with 'context', 'choices' and 'target'")
        try:
            items.append(MultipleChoiceItem(record["context"], record["choices"], record["target"], str(record.get("source", ""))))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    if not items:
        raise ValueError(f"{path} holds no items")
    return MultipleChoiceTask(name or path.stem, tuple(items), description=f"read from {path}")
