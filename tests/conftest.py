"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch (and BLAS) thread.

    The tensors in most tests are small: they gain nothing from threads, and oversubscribed
    OpenMP threads on shared cores slow them down by an order of magnitude.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
    else:
        with threadpool_limits(1):
            yield
    torch.set_num_threads(threads)
