"""The speed and quantization options of ``svdkit compress`` and ``svdkit eval``: rank multiples,
speed-aware ranks, weight quantization after compression, and decode / prefill timing against
the dense model."""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from ._common import positive_int

SPEED_BATCHES = (1, 8)
PREFILL = (8, 512)


def add_speed_option(parser: argparse.ArgumentParser) -> None:
    """``--speed``: decode tokens/s and prefill time against the dense model (slow: minutes)."""
    parser.add_argument("--speed", action="store_true",
                        help=f"also time greedy decoding (tokens/s at batch {' and '.join(map(str, SPEED_BATCHES))}, 32 tokens after "
                             f"64) and a prefill of {PREFILL[0]} x {PREFILL[1]} tokens, interleaved with the dense model it came from "
                             "(takes minutes)")


def add_compress_options(parser: argparse.ArgumentParser) -> None:
    """Rank multiples, speed-aware ranks and weight quantization of ``svdkit compress``."""
    parser.add_argument("--rank-multiple", type=positive_int, default=None,
                        help="every rank a multiple of this (default: the device's, 8 on CPUs and GPUs, on layers large enough)")
    parser.add_argument("--speed-aware", choices=("auto", "on", "off"), default="auto",
                        help="cap each layer's rank where it stops running faster than dense on this machine, measured and cached "
                             "(auto: on for causal LMs with a budget)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="after compression, quantize the factors and the remaining Linear weights (torchao weight-only; "
                             "int4 aligns the ranks to its group size)")
    parser.add_argument("--group-size", type=positive_int, default=None, help="int4's group size (32, 64 or 128; default 32)")
    add_speed_option(parser)


def quantize_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the quantization needs: int4 ranks on its group's multiple.

    Raises
    ------
    ValueError
        ``--group-size`` without int4, or a ``--rank-multiple`` the quantization cannot use.
    """
    from ..quantization import required_rank_multiple

    if args.group_size is not None and args.quantize != "int4":
        raise ValueError("--group-size applies to --quantize int4")
    if args.quantize is None:
        return {}
    needed = required_rank_multiple(args.quantize, args.group_size)
    if args.rank_multiple is not None and args.rank_multiple % needed:
        raise ValueError(f"--quantize {args.quantize} needs ranks that are multiples of {needed} (a factor's input size is its rank); "
                         f"--rank-multiple {args.rank_multiple} is not: pass a multiple of {needed}, or leave it out")
    return {"rank_multiple": args.rank_multiple or needed} if needed > 1 else {}


def check_quantize_platform(args: argparse.Namespace) -> None:
    """Refuse, before any work, a ``--quantize`` mode with no kernel here (on the CPU, in the saved dtype)."""
    if args.quantize is None:
        return
    import torch

    from ..quantization import check_platform

    check_platform(args.quantize, "cpu", getattr(torch, args.dtype or "float32"), args.group_size)


def check_quantize_model(args: argparse.Namespace, model) -> None:
    """Refuse, once the model is loaded and before it is compressed, dense weights ``--quantize``
    cannot take (their sizes stay those of the factors' outer sides; the ranks are aligned by
    the rank multiple)."""
    if args.quantize is not None:
        from ..quantization import check_alignment

        check_alignment(model, args.quantize, group_size=args.group_size)


def quantize(args: argparse.Namespace, model):
    """``model`` (compressed in place) cast to ``--dtype`` and quantized in place; the quantization's report."""
    import torch

    from ..quantization import quantize_weights

    if args.dtype is not None:
        model.to(getattr(torch, args.dtype))
    return quantize_weights(model, args.quantize, group_size=args.group_size, inplace=True)


def speed_columns(speed) -> dict[str, float]:
    """One :class:`~svdkit.speed.GenerationSpeed` as table columns: tokens/s per batch, prefill seconds."""
    out = {f"decode b{batch} tok/s": value for batch, value in speed.decode.items()}
    if speed.prefill is not None:
        out["prefill s"] = speed.prefill
    return out


def time_models(models: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Each model's :func:`speed_columns`, all timed interleaved on the same work."""
    from ..speed import generation_speed

    return {name: speed_columns(speed) for name, speed in generation_speed(models, batches=SPEED_BATCHES, prefill=PREFILL).items()}


def measure_speed(model, reference) -> dict[str, float]:
    """``model`` against ``reference`` (the dense one), timed interleaved: tokens/s and seconds of
    each, and the ratios (above 1: faster)."""
    from ..speed import generation_speed, speed_ratios

    timed = generation_speed({"model": model, "dense": reference}, batches=SPEED_BATCHES, prefill=PREFILL)
    out = speed_columns(timed["model"])
    out.update({f"dense {key}": value for key, value in speed_columns(timed["dense"]).items()})
    out.update(speed_ratios(timed["model"], timed["dense"]))
    return out
