"""The ``weight`` of a factorized layer: its dense weight, multiplied out only when read.

Code written for a dense layer often reads the layer's ``weight`` in its forward for its dtype or
device alone (T5's feed-forward checks ``wo.weight.dtype`` three times per call; ViT and CLIP
check their patch projection's). A factorized layer answers with :class:`LazyProduct`: a tensor
of the dense weight's shape, dtype and device that multiplies the factors only when an operation
reads its values, and then gives the exact product as a plain tensor. Reading the metadata costs
nothing, so a compressed T5 decodes as fast as its factors allow.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

__all__ = ["LazyProduct", "lazy_weight"]


class LazyProduct(torch.Tensor):
    """A tensor whose values are ``product()``, computed each time an operation reads them.

    Its shape, dtype and device are known without the product. Every torch operation on it runs
    on the product and returns plain tensors; an operation that would change it in place (``mul_``,
    ``copy_``, an initializer) is refused, since it could not reach the factors. It is not a
    parameter and carries no gradient: when gradients must reach the factors, :func:`lazy_weight`
    returns the product itself.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # the results are plain tensors

    @staticmethod
    def __new__(cls, product: Callable[[], torch.Tensor], shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> "LazyProduct":
        tensor = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=device)
        tensor.product = product
        return tensor

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func._schema.is_mutable:
            raise RuntimeError(f"{func} would change the weight of a factorized layer in place, which is the product of its "
                               "factors: change the factors (u and v, or reduce and expand) instead")
        return func(*_computed(args), **_computed(kwargs or {}))

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        return self.product().clone()

    def __repr__(self) -> str:
        return f"LazyProduct({self.product()!r})"


def _computed(value: Any) -> Any:
    if isinstance(value, LazyProduct):
        return value.product()
    if isinstance(value, (list, tuple)):
        return type(value)(_computed(item) for item in value)
    if isinstance(value, dict):
        return {key: _computed(item) for key, item in value.items()}
    return value


def lazy_weight(product: Callable[[], torch.Tensor], shape: Sequence[int], factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A factorized layer's dense weight: a :class:`LazyProduct`, or, when autograd must see the
    product (gradients enabled and a factor that requires them), the product itself.

    Parameters
    ----------
    product : callable
        Computes the dense weight, of shape ``shape``, in the factors' dtype and on their device.
    shape : sequence of int
    factors : sequence of Tensor
        The layer's factors (the first gives the dtype and device).
    """
    if torch.is_grad_enabled() and any(f.requires_grad for f in factors):
        return product()
    return LazyProduct(product, shape, factors[0].dtype, factors[0].device)
