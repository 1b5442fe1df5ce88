"""What ``svdkit compress`` checks before the long work: output names, the layer selection, a
rank that saves nothing; and a result not worth saving."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import target_spec


def output_directories(args: argparse.Namespace) -> list[tuple[float | None, Path]]:
    """(budget, directory) per result: several ``--params`` write ``OUTPUT-50``, ``OUTPUT-60``,
    ``OUTPUT-50.5``, ... (the percentage kept, to six significant digits).

    Raises
    ------
    ValueError
        A fraction given twice, or two fractions that would write the same directory.
    """
    if not (args.params and len(args.params) > 1 and not args.uniform):
        return [(None, Path(args.output))]
    outputs: dict[Path, float] = {}
    for budget in args.params:
        if budget in outputs.values():
            raise ValueError(f"--params lists {budget} twice: give each fraction once")
        path = Path(f"{args.output}-{budget * 100:.6g}")
        if path in outputs:
            raise ValueError(f"--params {outputs[path]} and {budget} would both be written to {path}: give fractions that differ in the first six digits")
        outputs[path] = budget
    return [(budget, path) for path, budget in outputs.items()]


def rank_words(args: argparse.Namespace) -> str:
    """The rank option as the user gave it, e.g. ``--rank 100000``."""
    for name in ("rank", "energy", "error", "params"):
        value = getattr(args, name, None)
        if value is not None:
            return f"--{name} {','.join(map(str, value)) if isinstance(value, tuple) else value}"
    return "the default budget"


def check_model_options(args: argparse.Namespace, loaded) -> None:
    """Refuse options that the loaded model would ignore: the token windows and the compute device
    belong to a causal LM's block pipeline; other models are compressed whole, where they are loaded."""
    given = [option for option, value in (("--seq-len", args.seq_len), ("--gradient-seqs", args.gradient_seqs),
                                          ("--device", args.device), ("--refine-epochs", getattr(args, "refine_epochs", None)),
                                          ("--heal-steps", getattr(args, "heal_steps", 0) or None)) if value is not None]
    if given and not loaded.is_causal_lm:
        several = len(given) > 1
        raise ValueError(f"{', '.join(given)} {'apply' if several else 'applies'} to causal language models (block by block); "
                         f"{loaded.spec!r} is a {loaded.kind} model, compressed whole: drop {'them' if several else 'it'}")
    if args.device is not None and (args.pipeline == "model" or args.refit):
        raise ValueError("--device moves each block of the block pipeline to the compute device; --pipeline model and "
                         "--refit compress the whole model where it is loaded (the CPU): drop --device")


def check_targets(args: argparse.Namespace, config, module) -> None:
    """After loading, before any calibration: the selection holds layers, each ``--exclude``
    names a module of the model, and an int ``--rank`` saves parameters in some layer (a rank-k
    factorization of an m x n matrix costs k (m + n) parameters).

    Raises
    ------
    ValueError
        Naming the option, its value and what the model holds.
    """
    from ..surgery import find_targets, matches_target
    from ..views import weight_matrix

    select = dict(kinds=config.kinds, include_embeddings=config.include_embeddings, include_head=config.include_head)
    candidates = [name for name, _ in find_targets(module, None, **select)]
    names = [name for name, _ in module.named_modules() if name]
    excluded = target_spec(args.exclude, "--exclude")
    regex = isinstance(excluded, str)
    for spec in [excluded] if regex else excluded or ():
        if not any(matches_target(name, spec if regex else (spec,)) for name in names):
            hint = f" (a regex must match the whole name, e.g. '.*{spec}')" if regex else ""
            raise ValueError(f"--exclude {spec!r} matches no module of the model{hint}; layers look like: {', '.join(candidates[:4])} ...")
    targets = find_targets(module, config.target_modules, exclude_modules=config.exclude_modules, **select)
    if not targets:
        raise ValueError(
            f"no layer to compress: --targets {' '.join(args.targets or ['(all)'])} with --exclude {' '.join(args.exclude) or '(none)'} "
            f"select none of the model's {len(candidates)} supported layers, e.g. {', '.join(candidates[:4])}"
        )
    if not isinstance(config.rank, int) or config.budget is not None or any(getattr(layer, "groups", 1) != 1 for _, layer in targets):
        return  # grouped convolutions are factorized per group: compress() judges them
    shapes = {name: tuple(weight_matrix(layer).shape) for name, layer in targets}
    even = {name: m * n / (m + n) for name, (m, n) in shapes.items()}
    if all(config.rank >= even[name] for name in shapes):
        best = max(even, key=even.get)
        raise ValueError(
            f"--rank {config.rank} keeps all {len(shapes)} targeted layers dense: a rank-k factorization of an m x n layer "
            f"saves parameters only when k < mn/(m+n), at most {even[best]:.1f} here ({best}, {shapes[best][0]}x{shapes[best][1]}); "
            "pass a smaller --rank, or --params"
        )


def factorized_nothing(args: argparse.Namespace, report, budget: float | None) -> str | None:
    """Why a result is not worth saving (every targeted layer stayed dense), or None."""
    if report.totals()["compressed"]:
        return None
    what = f"--params {budget}" if budget is not None else rank_words(args)
    return (f"nothing was factorized: all {len(report.layers)} targeted layers stay dense at {what}, so the result would be "
            "a dense copy; ask for fewer parameters (a smaller --rank, --energy or --params, a larger --error)")
