"""svdkit: the singular value decomposition at work on deep networks."""

__version__ = "0.1.0"
