"""``svdkit compress``: compress a model, print the report, save it, and measure its quality."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_PARAMS = 0.6
CALIBRATION_SENTENCES = 256
BATCH_SIZE = 32


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="compress a model into low-rank factors",
        description=(
            "Compress a model's Linear/Conv1D/Conv2d layers into low-rank factors and save it. "
            "Default: the fisher method (input whitening plus model-output sensitivity) with a global "
            f"budget of {DEFAULT_PARAMS:.0%} of the targeted parameters, calibrated on built-in English text."
        ),
    )
    parser.add_argument("model", help="minilm, a transformers or sentence-transformers directory, a .pt file, or package.module:factory")
    parser.add_argument("-o", "--output", required=True, help="directory to write the compressed model to")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--params", type=float, help=f"fraction of the targeted parameters to keep (default {DEFAULT_PARAMS})")
    size.add_argument("--energy", type=float, help="per layer: keep this fraction of the (whitened) spectral energy")
    size.add_argument("--rank", type=int, help="per layer: this rank")
    size.add_argument("--error", type=float, help="per layer: largest relative error of the (whitened) truncation")
    parser.add_argument("--uniform", action="store_true", help="with --params: the same fraction in every layer instead of a global budget")
    parser.add_argument("--method", default="fisher", help="svd, asvd, whiten or fisher (default: fisher)")
    parser.add_argument("--calib", default="builtin", help="'builtin' (English text shipped with Python), a .txt file (one text per line) or a .pt tensor of inputs")
    parser.add_argument("--calib-size", type=int, default=CALIBRATION_SENTENCES, help="calibration texts to use (default %(default)s)")
    parser.add_argument("--targets", nargs="+", help="layer names or suffixes to compress (PEFT style); one argument is taken as a regex")
    parser.add_argument("--exclude", nargs="+", default=(), help="layer names or suffixes to leave dense")
    parser.add_argument("--refit", type=int, default=0, help="closed-form refit passes after compression")
    parser.add_argument("--no-eval", action="store_true", help="skip the quality check on held-out text")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.set_defaults(run=run)


def _config(args: argparse.Namespace):
    from ..compression import CompressConfig
    from ..linalg import Energy, ErrorTol, ParamRatio

    fields: dict[str, Any] = {"method": args.method, "refit": args.refit, "exclude": tuple(args.exclude)}
    if args.targets:
        fields["target_modules"] = args.targets[0] if len(args.targets) == 1 and any(c in args.targets[0] for c in ".*[]()|^$+?\\") else tuple(args.targets)
    if args.energy is not None:
        fields["rank"] = Energy(args.energy)
    elif args.rank is not None:
        fields["rank"] = args.rank
    elif args.error is not None:
        fields["rank"] = ErrorTol(args.error)
    else:
        params = DEFAULT_PARAMS if args.params is None else args.params
        if args.uniform:
            fields["rank"] = ParamRatio(params)
        else:
            fields["budget"] = params
    return CompressConfig(**fields)


def _calibration(spec: str, size: int, loaded) -> list:
    import torch

    from ..data import calibration_sentences

    if spec == "builtin":
        if loaded.kind not in ("sentence-transformers", "transformers") or (loaded.kind == "transformers" and loaded.tokenizer is None):
            raise ValueError(f"built-in calibration text needs a text model with a tokenizer; {loaded.spec!r} is a {loaded.kind} model: pass --calib FILE.pt")
        texts = calibration_sentences(size)
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"no calibration file at {spec!r}")
        if path.suffix in (".pt", ".pth"):
            inputs = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(inputs, torch.Tensor):
                raise ValueError(f"{spec} must hold one tensor of inputs (batch first)")
            return list(inputs[:size].split(BATCH_SIZE))
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:size]
        if not texts:
            raise ValueError(f"{spec} holds no text")
    return [texts[i:i + BATCH_SIZE] for i in range(0, len(texts), BATCH_SIZE)]


def _progress():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return lambda iterable: tqdm(iterable, leave=False, file=sys.stderr, disable=not sys.stderr.isatty())


def _evaluate(loaded, compressed) -> dict[str, float]:
    from ..compression import embedding_agreement
    from ..data import builtin_sentences

    quality = {}
    for label, texts in (("held-out", builtin_sentences("topics", split="odd")[:512]), ("other domain", builtin_sentences("idle")[:512])):
        agreement = embedding_agreement(loaded.encode(texts), loaded.encode(texts, module=compressed))
        quality[f"{label} mean cosine"] = agreement["mean_cosine"]
        quality[f"{label} top-10 overlap"] = agreement["neighbour_overlap"]
    return quality


def run(args: argparse.Namespace) -> int:
    from ..compression import compress, save_compressed
    from ..models import load_model

    config = _config(args)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it")
    print(f"loading {args.model} ...", file=sys.stderr)
    loaded = load_model(args.model)
    calibration = _calibration(args.calib, args.calib_size, loaded) if config.needs_data else None
    print(f"compressing with {config.method} ...", file=sys.stderr)
    compressed, report = compress(loaded.module, config, calibration, forward=loaded.run, progress=_progress())
    if loaded.is_sentence_model and not args.no_eval:
        report.quality.update(_evaluate(loaded, compressed))
    save_compressed(compressed, output, source=args.model, config=config, overwrite=args.overwrite)
    print(report.to_table())
    print(f"saved to {output} (load with svdkit.load_compressed({str(output)!r}))")
    if args.json:
        Path(args.json).write_text(report.to_json())
    return 0
