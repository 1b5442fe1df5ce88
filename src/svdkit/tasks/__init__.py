"""Zero-shot multiple-choice accuracy of causal language models, offline, scored as lm-eval scores it.

- :mod:`~svdkit.tasks.items`: what an item and a task are; task files (JSON lines);
- :mod:`~svdkit.tasks.build`: svdkit's tasks (``"next-sentence"``, ``"last-word"``) built from
  held-out text of :mod:`svdkit.data`;
- :mod:`~svdkit.tasks.score`: log-likelihood of each choice and lm-eval's metrics (``acc``,
  ``acc_norm``, their standard errors);
- :mod:`~svdkit.tasks.export`: a task as an lm-evaluation-harness custom task (JSON lines + YAML);
- :mod:`~svdkit.tasks.run`: tasks by name or file, scored together.
"""

from .build import DEFAULT_ITEMS, build_task, task_names
from .export import export_lm_eval, lm_eval_task_name
from .items import MultipleChoiceItem, MultipleChoiceTask, load_task, save_task
from .run import get_task, task_accuracy
from .score import MultipleChoiceResult, choice_loglikelihoods, encode_pair, model_context_length, score_multiple_choice

__all__ = [
    "DEFAULT_ITEMS", "MultipleChoiceItem", "MultipleChoiceResult", "MultipleChoiceTask", "build_task", "choice_loglikelihoods",
    "encode_pair", "export_lm_eval", "get_task", "lm_eval_task_name", "load_task", "model_context_length", "save_task",
    "score_multiple_choice", "task_accuracy", "task_names",
]
