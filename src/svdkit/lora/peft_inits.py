"""PEFT's load-time inits: what ``PeftModel.from_pretrained`` does to the base before it loads
``lora_A`` / ``lora_B``, redone here exactly as PEFT does it, or refused.

PEFT builds the adapter layers with the ``init_lora_weights`` the adapter was saved with, then
overwrites ``A`` and ``B`` with the saved tensors. For most inits the base is untouched, so the
adapter is plain LoRA. But ``"pissa"`` and ``"olora"`` first move part of the *unmodified*
base weight into the adapter, ``W <- W - s B0 A0``, and the saved adapter is only meaningful on
that residual. svdkit's import redoes the residual with PEFT's own float32 operations (same
decomposition, same split, same order of operations), so the imported model computes what
PEFT's does, and keeps ``B0, A0`` as the layer's init factors (``export_peft`` then writes a
plain rank-``2r`` LoRA for the unmodified base).

Inits whose load-time effect cannot be redone exactly are refused with the way to convert them:
``pissa_niter_K`` (PEFT's ``torch.svd_lowrank`` draws from the global random state, so even
PEFT rebuilds a different base on every load), CorDA (needs PEFT's preprocessing statistics),
LoftQ (quantizes the base) and LoRA-GA (needs gradients).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..layers.lora import LoRALayer

__all__ = ["PeftLoadInit", "peft_load_init"]

_CONVERT = (
    "convert it to plain LoRA with PEFT: save the adapter right after get_peft_model() (before training) "
    "with init_lora_weights=True, then save the trained one with "
    "save_pretrained(..., path_initial_model_for_weight_conversion=<that directory>); the result is a "
    "rank-2r plain LoRA adapter for the unmodified base, which svdkit imports exactly"
)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Residual = Callable[[LoRALayer], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PeftLoadInit:
    """What PEFT does to a layer's base when it loads an adapter saved with one init.

    Attributes
    ----------
    name : str
        The ``init_lora_weights`` value, as a string.
    residual : callable or None
        ``residual(layer) -> (B0, A0, W_res)``: PEFT's init factors, ``B0`` of shape (out, r)
        and ``A0`` of shape (r, d), and the base matrix it leaves, of shape (out, d) in the
        weight's dtype. None when PEFT leaves the base untouched.
    kinds : tuple of str
        View kinds PEFT applies the init to (others cannot hold such an adapter).
    """

    name: str
    residual: Residual | None = None
    kinds: tuple[str, ...] = ("linear", "conv1d", "conv2d")

    def check_layer(self, layer_kind: str, weight: torch.Tensor, path: str, where: str) -> None:
        """Raise ``ValueError`` if PEFT could not have built this adapter on this layer, or if the
        residual cannot be redone on it."""
        if self.residual is None:
            return
        if layer_kind not in self.kinds:
            raise ValueError(
                f"the adapter at {where} was saved with init_lora_weights={self.name!r}, which PEFT applies to "
                f"{', '.join(self.kinds)} layers only, but it targets {path!r}, a {layer_kind} layer"
            )
        if weight.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"the adapter at {where} was saved with init_lora_weights={self.name!r}; PEFT rebuilds the base "
                f"of {path!r} in float32 and refuses {weight.dtype} weights: load the base in float32"
            )
        bad = int((~torch.isfinite(weight.detach())).sum())
        if bad:
            raise ValueError(f"layer {path!r} of the base model holds {bad} non-finite weight value(s); "
                             f"the {self.name!r} residual cannot be rebuilt")


def _pissa(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's ``LoraLayer.pissa_init`` (full SVD), step by step in its float32 operations."""
    weight = layer.base_layer.weight.detach().to(torch.float32)
    if layer.kind == "conv1d":  # PEFT's transpose(weight, fan_in_fan_out): the (out, in) matrix
        weight = weight.T
    r = layer.rank
    V, S, Uh = torch.linalg.svd(weight, full_matrices=False)
    Vr = V[:, :r]
    Sr = S[:r]
    Sr /= layer.scaling
    Uhr = Uh[:r]
    A0 = torch.diag(torch.sqrt(Sr)) @ Uhr
    B0 = Vr @ torch.diag(torch.sqrt(Sr))
    residual = weight - layer.scaling * B0 @ A0
    return B0, A0, residual.to(layer.base_layer.weight.dtype)


def _olora(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's ``LoraLayer.olora_init``: ``W = QR``, ``B0 = Q[:, :r]``, ``A0 = R[:r]``, in float32."""
    weight = layer.base_layer.weight.detach().to(torch.float32)
    r = layer.rank
    Q, R = torch.linalg.qr(weight)
    B0, A0 = Q[:, :r].contiguous(), R[:r].contiguous()
    residual = weight - layer.scaling * B0 @ A0
    return B0, A0, residual.to(layer.base_layer.weight.dtype)


# init_lora_weights -> what PEFT does at load time (inits that leave the base alone load as plain LoRA)
_LOAD_INITS: dict[str, PeftLoadInit] = {
    "true": PeftLoadInit("True"),
    "false": PeftLoadInit("False"),
    "gaussian": PeftLoadInit("gaussian"),
    "eva": PeftLoadInit("eva"),
    "orthogonal": PeftLoadInit("orthogonal"),
    "mica": PeftLoadInit("mica"),
    "pissa": PeftLoadInit("pissa", _pissa, kinds=("linear", "conv1d")),
    # PEFT's OLoRA factors the stored weight without fan_in_fan_out, so on a Conv1D it builds
    # factors of the transposed matrix that do not fit the layer: Linear only.
    "olora": PeftLoadInit("olora", _olora, kinds=("linear",)),
}
# init_lora_weights patterns PEFT rebuilds in a way that cannot be redone exactly -> why
_REFUSED: dict[str, str] = {
    r"pissa_niter_\d+": "PEFT redoes a randomized SVD (torch.svd_lowrank, seeded from the global random state) "
                        "of the base at load time, so the residual differs on every load, even in PEFT",
    r"corda.*": "PEFT rebuilds the base from CorDA's calibration statistics, which the adapter does not hold",
    r"loftq": "PEFT replaces the base by a quantized one at load time",
    r"lora_ga": "PEFT rebuilds the base from gradients of training data, which the adapter does not hold",
}


def peft_load_init(value: Any, where: str) -> PeftLoadInit:
    """What PEFT does at load time for an adapter saved with ``init_lora_weights=value``.

    Parameters
    ----------
    value : bool or str
        The config's ``init_lora_weights``.
    where : str
        The adapter's location, for messages.

    Raises
    ------
    ValueError
        Naming the init and how to convert the adapter, for inits whose load-time effect on
        the base svdkit cannot redo exactly (or does not know).
    """
    key = str(value) if isinstance(value, bool) else value
    if isinstance(key, str) and key.lower() in _LOAD_INITS:
        return _LOAD_INITS[key.lower()]
    for pattern, reason in _REFUSED.items():
        if isinstance(key, str) and re.fullmatch(pattern, key):
            raise ValueError(
                f"the adapter at {where} was saved by PEFT with init_lora_weights={value!r}: {reason}. "
                f"svdkit cannot import it exactly; {_CONVERT}"
            )
    raise ValueError(
        f"the adapter at {where} was saved with init_lora_weights={value!r}, an init svdkit does not know; "
        f"if PEFT rewrites the base with it at load time, {_CONVERT}"
    )

