"""Compute devices: which ones this machine has, and a device name checked before any work."""

from __future__ import annotations

import torch

__all__ = ["available_devices", "check_device"]


def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, then ``cuda:i (name)`` and ``mps`` where present."""
    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str | torch.device, *, field: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, refused at once when this machine cannot use it.

    Parameters
    ----------
    device : str or torch.device
        E.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
    field : str
        The option or parameter that gave it, for the message (e.g. ``"--device"``).

    Raises
    ------
    ValueError
        A name torch does not know, or a device this machine lacks (CUDA not built or no GPU
        visible, a CUDA index beyond the devices present, MPS not available); the message names
        the device and lists the available ones.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{field}: {device!r} is not a device name ({exc}); use e.g. 'cpu' or 'cuda'") from None
    available = ", ".join(available_devices())
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"{field} {device!r}: {why}; available here: {available}")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{field} {device!r}: this machine has {count} CUDA device(s); available here: {available}")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{field} {device!r}: MPS is not available on this machine; available here: {available}")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        is_available = getattr(backend, "is_available", None)
        if not callable(is_available) or not is_available():
            raise ValueError(f"{field} {device!r}: {parsed.type} is not available on this machine; available here: {available}")
    return parsed
