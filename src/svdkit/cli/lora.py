"""``svdkit lora``: extract adapters from a fine-tune, and look at the spectra of its weight changes.

::

    svdkit lora extract BASE FINETUNED -o DIR --rank 16     # writes a PEFT adapter directory
    svdkit lora extract BASE FINETUNED -o DIR --energy 0.9  # per-layer ranks keeping 90 % energy
    svdkit lora analyze BASE FINETUNED                      # the weight-change spectrum table

``--json FILE`` also writes the result as JSON (``--json -``: to standard output instead of the
table). Output paths are checked before the models are loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (
    add_output_options,
    add_rank_options,
    add_target_options,
    check_outputs,
    positive_int,
    progress_option,
    rank_from_options,
    target_spec,
    write_json,
)

DEFAULT_RANK = 16
# svdkit.linalg.SVD_METHODS, spelled here so that `svdkit --help` does not import torch
# (tests/test_vocabulary.py checks that every --svd-method offers exactly these).
SVD_METHODS = ("auto", "exact", "randomized")
DEFAULT_RANKS = (1, 4, 8, 16, 32)


def _ranks(value: str) -> list[int]:
    try:
        ranks = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {value!r}") from None
    if not ranks or any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"ranks must be integers >= 1, got {value!r}")
    return ranks


def _add_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="base model spec (a transformers or sentence-transformers directory, minilm, pkg.mod:factory, file.pt)")
    parser.add_argument("finetuned", metavar="FINETUNED", help="fine-tuned model spec of the same architecture")
    add_target_options(parser, what="layers to compare (default: every Linear/Conv1D/Conv2d but the output head)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("lora", help="extract LoRA adapters from a fine-tune; analyse weight changes")
    sub = parser.add_subparsers(dest="lora_command", metavar="ACTION", required=True)

    extract = sub.add_parser("extract", help="per-layer SVD of W_ft - W_base -> a PEFT LoRA adapter directory")
    _add_models(extract)
    extract.add_argument("-o", "--output", required=True, help="adapter directory to write (PEFT format)")
    add_rank_options(extract, params=False, rank_help=f"rank of every adapter (default {DEFAULT_RANK})")
    extract.add_argument("--lora-alpha", type=float, default=None, help="lora_alpha of every adapter (default: lora_alpha = rank, scaling 1)")
    extract.add_argument("--svd-method", choices=SVD_METHODS, default="exact",
                         help="decomposition: exact (default), randomized (needs --rank), auto (randomized where the rank is below a tenth of the layer's smaller side)")
    extract.add_argument("--base-name", default=None, help="base_model_name_or_path to record (default: BASE)")
    extract.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_output_options(extract, json_help="also write the extraction report as JSON to FILE ('-': standard output, instead of the table)")
    extract.set_defaults(run=run_extract)

    analyze = sub.add_parser("analyze", help="spectrum of each layer's weight change and its low-rank errors")
    _add_models(analyze)
    analyze.add_argument("--ranks", type=_ranks, nargs="+", default=[list(DEFAULT_RANKS)], metavar="K",
                         help="ranks whose relative error to show, e.g. --ranks 1 4 8 (default 1 4 8 16 32)")
    analyze.add_argument("--top", type=positive_int, default=10, help="leading singular values for the energy share (default 10)")
    add_output_options(analyze, json_help="also write the spectra as JSON to FILE ('-': standard output, instead of the table)")
    analyze.set_defaults(run=run_analyze)


def _load(spec: str, which: str):
    from ..models import load_model

    try:
        return load_model(spec)
    except (ImportError, FileNotFoundError):
        raise
    except Exception as exc:  # a damaged file or an unloadable spec is a user error, not a traceback
        raise ValueError(f"cannot load the {which} model {spec!r}: {exc}") from exc


def _load_pair(args: argparse.Namespace):
    return _load(args.base, "base"), _load(args.finetuned, "fine-tuned")


def run_extract(args: argparse.Namespace) -> int:
    from ..lora import export_peft, extract_lora
    from ..lora.peft_io import check_adapter_target

    check_outputs(directories=(args.output,), files=(args.json,), overwrite=args.overwrite)
    check_adapter_target(args.output, args.overwrite)  # never into a model's directory
    rank = rank_from_options(args)
    base, finetuned = _load_pair(args)
    model, report = extract_lora(
        base.module, finetuned.module, DEFAULT_RANK if rank is None else rank,
        target_modules=target_spec(args.targets), exclude_modules=target_spec(args.exclude, "--exclude") or (), lora_alpha=args.lora_alpha,
        svd_method=args.svd_method, progress=progress_option(args),
    )
    name = args.base_name or (str(Path(args.base).resolve()) if Path(args.base).exists() else args.base)
    out = export_peft(model, args.output, base_model_name_or_path=name, overwrite=args.overwrite)
    report.to_json(out / "extraction_report.json")
    write_json(args.json, report.to_json())
    if args.json != "-":
        print(report.to_table())
        print(f"wrote {out / 'adapter_config.json'} and {out / 'adapter_model.safetensors'}")
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    from ..lora import analyze_deltas

    check_outputs(files=(args.json,))
    ranks = sorted({k for group in args.ranks for k in group})
    base, finetuned = _load_pair(args)
    spectra = analyze_deltas(
        base.module, finetuned.module, target_modules=target_spec(args.targets), exclude_modules=target_spec(args.exclude, "--exclude") or (),
        ranks=ranks, top=args.top, progress=progress_option(args),
    )
    write_json(args.json, spectra.to_json())
    if args.json != "-":
        print(spectra.to_table())
    return 0
