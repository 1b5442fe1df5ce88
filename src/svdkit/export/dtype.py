"""The dtype a compressed model's weights are saved in."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch

__all__ = ["SAVE_DTYPES", "dtype_name", "parse_dtype", "weights_dtype"]

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A floating-point dtype to save weights in, from its name (``"bfloat16"``, ``"torch.float16"``)
    or itself; None stays None (keep the model's own dtype).

    Raises
    ------
    ValueError
        Not one of float32, bfloat16, float16, float64 (integer and quantized dtypes are not
        casts of trained weights).
    """
    if value is None:
        return None
    name = dtype_name(value) if isinstance(value, torch.dtype) else str(value).removeprefix("torch.")
    if name not in SAVE_DTYPES:
        raise ValueError(f"dtype must be a floating-point dtype, one of {', '.join(SAVE_DTYPES)}; got {value!r}")
    return SAVE_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (as transformers writes it in ``config.json``)."""
    return str(dtype).removeprefix("torch.")


def weights_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    """The dtype most floating-point tensors of ``tensors`` have (by element count), or None."""
    counts: Counter[torch.dtype] = Counter()
    for tensor in tensors:
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else None
