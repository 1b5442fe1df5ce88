"""Drive trackers and recorders from a transformers ``Trainer`` (imported lazily)."""

from __future__ import annotations

from typing import Any

__all__ = ["trainer_callback"]

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

        ``on_train_begin`` records the starting point (``state.global_step``),
        ``on_pre_optimizer_step`` records gradients for the trajectory recorders (after
        clipping, before the update), ``on_step_end`` steps every observer with
        ``state.global_step``, and ``on_train_end`` flushes. Remove it with
        ``trainer.remove_callback(callback)``.
        """

        def __init__(self, observers: tuple) -> None:
            self.observers = observers

        def on_train_begin(self, args, state, control, **kwargs):
            from .training_tracker import SpectralTracker

            for obs in self.observers:
                if isinstance(obs, SpectralTracker):
                    if obs._last_recorded is None:
                        obs.record(state.global_step)
                else:
                    obs.snapshot(state.global_step)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            from .training_trajectory import TrajectoryRecorder

            for obs in self.observers:
                if isinstance(obs, TrajectoryRecorder) and state.global_step % obs.every == 0:
                    obs.record_gradient(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            for obs in self.observers:
                obs.step(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            for obs in self.observers:
                flush = getattr(obs, "flush", None)
                if flush is not None:
                    flush()

    _CALLBACK_CLASS = SVDTrainingCallback
    return _CALLBACK_CLASS


def trainer_callback(*observers: Any):
    """A ``transformers.TrainerCallback`` that drives trackers and trajectory recorders.

    Parameters
    ----------
    *observers : SpectralTracker or TrajectoryRecorder
        At least one.

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
    from .training_tracker import SpectralTracker
    from .training_trajectory import TrajectoryRecorder

    if not observers:
        raise ValueError("trainer_callback needs at least one SpectralTracker or TrajectoryRecorder")
    for obs in observers:
        if not isinstance(obs, (SpectralTracker, TrajectoryRecorder)):
            raise TypeError(f"observers must be SpectralTracker or TrajectoryRecorder, got {type(obs).__name__}")
    return _callback_class()(tuple(observers))
