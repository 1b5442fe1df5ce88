"""A task as an lm-evaluation-harness custom task: its items as local JSON lines and a YAML config.

lm-eval (0.4.x) reads a task from a YAML file in a folder it is pointed at (``--include_path
DIR``, or ``TaskManager(include_path=DIR)`` in Python); this one loads the items with the
``json`` builder of the datasets library from a local file and scores them as a
``multiple_choice`` task, zero-shot, with the same requests and metrics as
:func:`svdkit.tasks.score_multiple_choice` (``acc``, ``acc_norm``)::

    lm-eval run --model hf --model_args pretrained=DIR --include_path TASKS --tasks svdkit_next_sentence

The YAML is written without a YAML library: every value is a JSON scalar, which YAML reads as is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .items import MultipleChoiceTask, save_task

__all__ = ["export_lm_eval", "lm_eval_task_name"]


def lm_eval_task_name(task: MultipleChoiceTask) -> str:
    """The task's name in lm-eval: ``svdkit_`` and its name in lower-case identifier characters."""
    return "svdkit_" + re.sub(r"\W+", "_", task.name.lower()).strip("_")


def export_lm_eval(task: MultipleChoiceTask, directory: str | Path) -> Path:
    """Write ``task`` as an lm-eval task: ``<name>.jsonl`` (the items) and ``<name>.yaml`` (the config).

    Parameters
    ----------
    task : MultipleChoiceTask
    directory : str or Path
        Created if missing. The YAML names the data file by its absolute path: move both files
        together and export again, or edit ``data_files``.

    Returns
    -------
    Path
        The YAML file.
    """
    directory = Path(directory).resolve()
    name = lm_eval_task_name(task)
    data = save_task(task, directory / f"{name}.jsonl")
    q = json.dumps
    lines = [
        f"task: {q(name)}",
        "tag:",
        "  - svdkit",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {q(str(data))}",
        "test_split: test",
        "output_type: multiple_choice",
        "num_fewshot: 0",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: target",
        f"target_delimiter: {q(task.target_delimiter)}",
        "metric_list:",
        *[f"  - metric: {metric}\n    aggregation: mean\n    higher_is_better: true" for metric in ("acc", "acc_norm")],
        "metadata:",
        "  version: 1.0",
        f"  description: {q(task.description)}",
        f"  items: {len(task.items)}",
    ]
    path = directory / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
