"""Tasks by name or file, scored together: the entry point the CLI and reports use."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..progress import ProgressLike
from .build import DEFAULT_ITEMS, build_task, task_names
from .items import MultipleChoiceTask, load_task
from .score import MultipleChoiceResult, score_multiple_choice

__all__ = ["get_task", "task_accuracy"]


def get_task(spec: str | Path | MultipleChoiceTask, *, n_items: int = DEFAULT_ITEMS, seed: int = 0) -> MultipleChoiceTask:
    """A task: a built-in one by name (:func:`svdkit.tasks.build_task`), a task file
    (``.jsonl``, :func:`svdkit.tasks.load_task`), or a task given as is.

    Raises
    ------
    ValueError
        A name that is neither a built-in task nor an existing file (the message lists the
        built-in tasks).
    """
    if isinstance(spec, MultipleChoiceTask):
        return spec
    if str(spec) in task_names():
        return build_task(str(spec), n_items=n_items, seed=seed)
    if Path(spec).is_file():
        return load_task(spec)
    raise ValueError(f"unknown task {str(spec)!r}: give a built-in task ({', '.join(task_names())}) or a .jsonl task file")


def task_accuracy(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str | Path | MultipleChoiceTask] | None = None,
    *,
    n_items: int = DEFAULT_ITEMS,
    seed: int = 0,
    progress: ProgressLike = False,
) -> dict[str, MultipleChoiceResult]:
    """Score a model on several tasks (default: every built-in one), task name -> result."""
    chosen = [get_task(spec, n_items=n_items, seed=seed) for spec in (task_names() if tasks is None else tasks)]
    return {task.name: score_multiple_choice(model, tokenizer, task, progress=progress) for task in chosen}
