"""Drive trackers and recorders from a transformers ``Trainer`` (imported lazily).

The callback knows its observers only by the methods it calls (:data:`OBSERVER_METHODS`), so this
module imports neither the tracker nor the recorder: they import it, for their
``trainer_callback()`` shortcut, and nothing imports back.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OBSERVER_METHODS", "trainer_callback"]

#: What the callback calls on each observer, with the Trainer's ``global_step``.
OBSERVER_METHODS = ("train_begin", "pre_optimizer_step", "step", "flush")

_CALLBACK_CLASS = None


def _callback_class():
    global _CALLBACK_CLASS
    if _CALLBACK_CLASS is not None:
        return _CALLBACK_CLASS
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError("trainer_callback needs transformers: pip install transformers (or pip install 'svdkit[hf]')") from exc

    class SVDTrainingCallback(TrainerCallback):
        """Records spectra and trajectories at the Trainer's optimizer steps.

        ``on_train_begin`` calls each observer's ``train_begin(state.global_step)`` (record the
        starting point unless one is recorded), ``on_pre_optimizer_step`` its
        ``pre_optimizer_step(step)`` (gradients, after clipping, before the update),
        ``on_step_end`` its ``step(state.global_step)`` and ``on_train_end`` its ``flush()``.
        Remove it with ``trainer.remove_callback(callback)``.
        """

        def __init__(self, observers: tuple) -> None:
            self.observers = observers

        def on_train_begin(self, args, state, control, **kwargs):
            for obs in self.observers:
                obs.train_begin(state.global_step)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            for obs in self.observers:
                obs.pre_optimizer_step(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            for obs in self.observers:
                obs.step(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            for obs in self.observers:
                obs.flush()

    _CALLBACK_CLASS = SVDTrainingCallback
    return _CALLBACK_CLASS


def trainer_callback(*observers: Any):
    """A ``transformers.TrainerCallback`` that drives trackers and trajectory recorders.

    Parameters
    ----------
    *observers : SpectralTracker or TrajectoryRecorder
        At least one; any object with the methods of :data:`OBSERVER_METHODS` will do.

    Returns
    -------
    transformers.TrainerCallback
        Pass it as ``Trainer(..., callbacks=[cb])`` or ``trainer.add_callback(cb)``; detach it
        with ``trainer.remove_callback(cb)``.

    Raises
    ------
    ImportError
        If transformers is not installed.
    TypeError
        For an observer that is neither a tracker nor a recorder.
    """
    if not observers:
        raise ValueError("trainer_callback needs at least one SpectralTracker or TrajectoryRecorder")
    for obs in observers:
        missing = [m for m in OBSERVER_METHODS if not callable(getattr(obs, m, None))]
        if missing:
            raise TypeError(
                f"observers must be SpectralTracker or TrajectoryRecorder (objects with {', '.join(OBSERVER_METHODS)} "
                f"methods), got {type(obs).__name__}, which lacks {', '.join(missing)}"
            )
    return _callback_class()(tuple(observers))
