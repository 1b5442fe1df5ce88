"""``svdkit eval``: the quality of a model, or of a compressed model against its source.

For a causal language model: perplexity on every held-out evaluation domain (or on ``--data``
files), a greedy continuation of a fixed prompt and, with ``--tasks``, zero-shot multiple-choice
accuracy (:mod:`svdkit.tasks`). For a directory
written by ``svdkit compress``, the model it was compressed from is measured too, side by side,
unless ``--no-reference``. ``--speed`` adds decode tokens/s (batch 1 and 8) and the prefill time of
both, timed interleaved.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ._common import add_output_options, check_outputs, progress_option, table_stream, write_json
from ._speed import add_speed_option, time_models

PROMPT = "The for statement in Python"


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity of a causal LM (and of the model a compressed one came from)")
    parser.add_argument("model", help="a model spec or a directory written by svdkit compress")
    parser.add_argument("--data", nargs="+", default=None,
                        help="texts to score: evaluation domains (in-domain, other-domain, legal-english, math-docs) or .txt / .pt "
                             "files (default: every domain)")
    parser.add_argument("--tasks", nargs="*", default=None, metavar="TASK",
                        help="also score zero-shot multiple-choice tasks: next-sentence, last-word or .jsonl task files "
                             "(no name: both built-in ones, 200 items each)")
    parser.add_argument("--max-tokens", type=int, default=24 * 512, help="tokens of each text (default 24 x 512)")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default 512, or the model's context if shorter)")
    parser.add_argument("--stride", type=int, default=None, help="step between windows (default: the window length)")
    parser.add_argument("--no-reference", action="store_true", help="do not measure the source model of a compressed directory")
    parser.add_argument("--no-verify", action="store_true",
                        help="load a compressed directory whose files do not match the SHA-256 recorded when it was saved")
    add_speed_option(parser)
    add_output_options(parser, json_help="also write the results as JSON to FILE ('-': standard output)")
    parser.set_defaults(run=run)


def _measure(loaded, args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    from ..eval import greedy_continuation, language_model_quality

    if not loaded.is_causal_lm:
        raise ValueError(f"{loaded.spec!r} is a {loaded.kind} model; svdkit eval measures causal language models (perplexity)")
    from ..tokens import EVALUATION_DOMAINS

    data = args.data or list(EVALUATION_DOMAINS)
    if loaded.tokenizer is None and (args.tasks is not None or any(d in EVALUATION_DOMAINS or d.endswith(".txt") for d in data)):
        raise ValueError(f"{loaded.spec!r} has no tokenizer: pass --data FILE.pt with token ids (and no --tasks)")
    context = loaded.context_length
    if args.seq_len is not None and context is not None and args.seq_len > context:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the context of {loaded.spec!r} ({context} tokens): pass --seq-len {context} or less")
    result: dict[str, Any] = language_model_quality(
        loaded.module, loaded.tokenizer, data=data, max_tokens=args.max_tokens, seq_len=args.seq_len,
        stride=args.stride, progress=progress,
    )
    if loaded.tokenizer is not None:
        result["continuation"] = greedy_continuation(loaded.module, loaded.tokenizer, PROMPT)
    if args.tasks is not None:
        from ..tasks import task_accuracy

        for name, scored in task_accuracy(loaded.module, loaded.tokenizer, args.tasks or None, progress=progress).items():
            result.update({f"{name} acc": scored.acc, f"{name} acc_norm": scored.acc_norm, f"{name} acc stderr": scored.acc_stderr})
    return result


def run(args: argparse.Namespace) -> int:
    from ..compression.io import CONFIG_NAME, read_description
    from ..eval import worst_ratio
    from ..models import load_model
    from ..tokens import EVALUATION_DOMAINS

    for name, value in (("--max-tokens", args.max_tokens), ("--seq-len", args.seq_len)):
        if value is not None and value < 2:
            raise ValueError(f"{name} must be >= 2, got {value}")
    if args.stride is not None and not 1 <= args.stride <= (args.seq_len or args.stride):
        raise ValueError(f"--stride must be >= 1 and at most --seq-len, got {args.stride}")
    check_outputs(files=(args.json,))
    for data in args.data or ():  # a file that is not there is named before any model is loaded or measured
        if data not in EVALUATION_DOMAINS and not Path(data).is_file():
            raise FileNotFoundError(f"--data {data!r}: no such file (use {', '.join(map(repr, EVALUATION_DOMAINS))}, or .txt / .pt files)")
    progress = progress_option(args)
    path = Path(args.model)
    source = None
    if not args.no_reference and path.is_dir() and (path / CONFIG_NAME).exists():
        source = read_description(path).get("source")
        if source:
            _check_reference(source, path)
    loaded = load_model(args.model, verify=not args.no_verify)
    results = {"model": _measure(loaded, args, progress)}
    if source:
        try:
            reference = load_model(source)
        except (FileNotFoundError, ValueError, ImportError) as exc:
            raise ValueError(f"{_reference_note(source, path)}, cannot be loaded: {exc}; pass --no-reference to measure {path} alone") from exc
        results["source"] = _measure(reference, args, progress)
    if args.speed:  # both models timed interleaved on the same work, so that their ratio holds on a busy machine
        print("timing decoding and prefill ...", file=sys.stderr)
        timed = time_models({"model": loaded.module, **({"source": reference.module} if source else {})})
        for which, columns in timed.items():
            results[which].update(columns)
    rows = [("", *results)]
    keys = list(results["model"])
    for key in keys:
        cells = [results[which].get(key) for which in results]
        rows.append((key, *(f"{c:.3f}" if isinstance(c, float) else repr(c) for c in cells)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip(), file=table_stream(args))
    if "source" in results:
        for key in keys:
            if isinstance(results["model"][key], float) and "stderr" not in key:
                print(f"{key}: {results['model'][key] / results['source'][key]:.3f}x the source", file=sys.stderr)
        worst, ratio = worst_ratio({d: results["model"][d] for d in args.data or EVALUATION_DOMAINS}, results["source"])
        print(f"worst perplexity ratio: {ratio:.3f}x the source, on {worst}", file=sys.stderr)
    write_json(args.json, json.dumps(results, indent=2))
    return 0


def _reference_note(source: str, directory: Path) -> str:
    return f"the reference model that {directory} was compressed from, {source!r}"


def _check_reference(source: str, directory: Path) -> None:
    """Refuse, before anything is measured, a recorded source path that no longer exists (a
    directory without its own transformers config needs its source to load at all: load_model
    says so)."""
    is_path = source not in ("minilm", "smollm2") and ":" not in source
    if is_path and not Path(source).exists() and (directory / "config.json").exists():
        raise FileNotFoundError(
            f"{_reference_note(source, directory)}, is gone (no file or directory there): restore it, "
            "or pass --no-reference to measure the compressed model alone"
        )
