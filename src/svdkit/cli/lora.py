"""``svdkit lora``: extract adapters from a fine-tune, and look at the spectra of its weight changes.

::

    svdkit lora extract BASE FINETUNED -o DIR --rank 16     # writes a PEFT adapter directory
    svdkit lora extract BASE FINETUNED -o DIR --energy 0.9  # per-layer ranks keeping 90 % energy
    svdkit lora analyze BASE FINETUNED                      # the weight-change spectrum table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ranks(value: str) -> list[int]:
    try:
        ranks = [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not ranks or any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"ranks must be integers >= 1, got {value!r}")
    return ranks


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="base model spec (a transformers or sentence-transformers directory, minilm, pkg.mod:factory, file.pt)")
    parser.add_argument("finetuned", metavar="FINETUNED", help="fine-tuned model spec of the same architecture")
    parser.add_argument("--targets", type=_csv, default=None, help="comma-separated layer names or suffixes (default: every Linear/Conv1D/Conv2d but the output head)")
    parser.add_argument("--exclude", type=_csv, default=[], help="comma-separated layer names or suffixes to skip")


def register(subparsers) -> None:
    parser = subparsers.add_parser("lora", help="extract LoRA adapters from a fine-tune; analyse weight changes")
    sub = parser.add_subparsers(dest="lora_command", metavar="ACTION", required=True)

    extract = sub.add_parser("extract", help="per-layer SVD of W_ft - W_base -> a PEFT LoRA adapter directory")
    _add_selection(extract)
    extract.add_argument("-o", "--output", required=True, help="adapter directory to write (PEFT format)")
    size = extract.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, default=None, help="rank of every adapter (default 16)")
    size.add_argument("--energy", type=float, default=None, help="per-layer rank keeping this fraction of the change's energy, e.g. 0.9")
    size.add_argument("--error-tol", type=float, default=None, help="per-layer rank with relative error at most this, e.g. 0.1")
    extract.add_argument("--alpha", type=float, default=None, help="lora_alpha of every adapter (default: alpha = rank, scaling 1)")
    extract.add_argument("--svd", choices=("exact", "randomized"), default="exact", help="decomposition (randomized needs --rank)")
    extract.add_argument("--base-name", default=None, help="base_model_name_or_path to record (default: BASE)")
    extract.add_argument("--json", action="store_true", help="print the report as JSON")
    extract.set_defaults(run=run_extract)

    analyze = sub.add_parser("analyze", help="spectrum of each layer's weight change and its low-rank errors")
    _add_selection(analyze)
    analyze.add_argument("--ranks", type=_ranks, default=[1, 4, 8, 16, 32], help="ranks whose relative error to show (default 1,4,8,16,32)")
    analyze.add_argument("--top", type=int, default=10, help="leading singular values for the energy share (default 10)")
    analyze.add_argument("--json", action="store_true", help="print the spectra as JSON")
    analyze.set_defaults(run=run_analyze)


def _load_pair(args: argparse.Namespace):
    from ..models import load_model

    return load_model(args.base), load_model(args.finetuned)


def run_extract(args: argparse.Namespace) -> int:
    from ..linalg import Energy, ErrorTol
    from ..lora import export_peft, extract_lora

    if args.energy is not None:
        rank = Energy(args.energy)
    elif args.error_tol is not None:
        rank = ErrorTol(args.error_tol)
    else:
        rank = 16 if args.rank is None else args.rank
    base, finetuned = _load_pair(args)
    model, report = extract_lora(
        base.module, finetuned.module, rank, targets=args.targets, exclude=args.exclude, alpha=args.alpha, svd_method=args.svd
    )
    name = args.base_name or (str(Path(args.base).resolve()) if Path(args.base).exists() else args.base)
    out = export_peft(model, args.output, base_model_name_or_path=name)
    (out / "extraction_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
        print(f"wrote {out / 'adapter_config.json'} and {out / 'adapter_model.safetensors'}")
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    from ..lora import analyze_deltas, format_delta_table

    base, finetuned = _load_pair(args)
    spectra = analyze_deltas(base.module, finetuned.module, targets=args.targets, exclude=args.exclude, ranks=args.ranks, top=args.top)
    if args.json:
        print(json.dumps([s.to_dict() for s in spectra], indent=2))
    else:
        print(format_delta_table(spectra))
    return 0
