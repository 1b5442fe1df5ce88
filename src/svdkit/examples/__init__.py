"""Runnable examples: ``python -m svdkit.examples.<name> --help``."""

__all__: list[str] = []
