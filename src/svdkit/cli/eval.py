"""``svdkit eval``: the quality of a model, or of a compressed model against its source.

For a causal language model: perplexity on every held-out evaluation domain (or on ``--data``
files), a greedy continuation of a fixed prompt and, with ``--tasks``, zero-shot multiple-choice
accuracy (:mod:`svdkit.tasks`). For a directory
written by ``svdkit compress``, the model it was compressed from is measured too, side by side,
unless ``--no-reference``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ._common import add_output_options, check_outputs, progress_option, write_json

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
    parser.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    parser.add_argument("--stride", type=int, default=None, help="step between windows (default: the window length)")
    parser.add_argument("--no-reference", action="store_true", help="do not measure the source model of a compressed directory")
    add_output_options(parser, json_help="also write the results as JSON to FILE ('-': standard output)")
    parser.set_defaults(run=run)


def _measure(loaded, args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    from ..eval import greedy_continuation, language_model_quality

    if not loaded.is_causal_lm:
        raise ValueError(f"{loaded.spec!r} is a {loaded.kind} model; svdkit eval measures causal language models (perplexity)")
    from ..tokens import EVALUATION_DOMAINS

    domains = args.data or list(EVALUATION_DOMAINS)
    if loaded.tokenizer is None and (args.tasks is not None or any(d in EVALUATION_DOMAINS or d.endswith(".txt") for d in domains)):
        raise ValueError(f"{loaded.spec!r} has no tokenizer: pass --data FILE.pt with token ids (and no --tasks)")
    result: dict[str, Any] = language_model_quality(
        loaded.module, loaded.tokenizer, domains=domains, max_tokens=args.max_tokens, seq_len=args.seq_len,
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
    from pathlib import Path

    from ..compression.io import CONFIG_NAME, read_description
    from ..eval import worst_ratio
    from ..models import load_model
    from ..tokens import EVALUATION_DOMAINS

    for name, value in (("--max-tokens", args.max_tokens), ("--seq-len", args.seq_len)):
        if value < 2:
            raise ValueError(f"{name} must be >= 2, got {value}")
    check_outputs(files=(args.json,))
    progress = progress_option(args)
    loaded = load_model(args.model)
    results = {"model": _measure(loaded, args, progress)}
    path = Path(args.model)
    if not args.no_reference and path.is_dir() and (path / CONFIG_NAME).exists():
        source = read_description(path).get("source")
        if source:
            results["source"] = _measure(load_model(source), args, progress)
    rows = [("", *results)]
    keys = list(results["model"])
    for key in keys:
        cells = [results[which].get(key) for which in results]
        rows.append((key, *(f"{c:.3f}" if isinstance(c, float) else repr(c) for c in cells)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    if "source" in results:
        for key in keys:
            if isinstance(results["model"][key], float) and "stderr" not in key:
                print(f"{key}: {results['model'][key] / results['source'][key]:.3f}x the source", file=sys.stderr)
        worst, ratio = worst_ratio({d: results["model"][d] for d in args.data or EVALUATION_DOMAINS}, results["source"])
        print(f"worst perplexity ratio: {ratio:.3f}x the source, on {worst}", file=sys.stderr)
    write_json(args.json, json.dumps(results, indent=2))
    return 0
