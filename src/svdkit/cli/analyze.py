"""``svdkit analyze``: spectral diagnostics of a model's weights (and, optionally, its representations)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import add_output_options, add_target_options, check_outputs, progress_option, relative_error, target_spec, write_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="spectral diagnostics of weights and representations",
        description=(
            "Analyse the spectra of a model's weight matrices (ranks, norms, power-law alpha, the compression "
            "verdict) and, with --activations, of its representations on text, which also gives each layer's "
            "activation-aware (input-whitened) verdict. MODEL is any model spec (minilm, a transformers or "
            "sentence-transformers directory, package.module:factory, a .pt file) or a .safetensors file or "
            "directory of shards, read one tensor at a time."
        ),
    )
    parser.add_argument("model", metavar="MODEL")
    add_target_options(parser, what="weights to analyse (default: every matrix)")
    parser.add_argument("--conv2d", choices=("matrix", "slices", "both"), default="matrix",
                        help="Conv2d as the (out, in*kh*kw) matrix, as WeightWatcher's pooled slices, or both")
    parser.add_argument("--mp-fit", action="store_true", help="add WeightWatcher's Marchenko-Pastur fit (needs scipy)")
    parser.add_argument("--error", type=relative_error, default=None,
                        help="relative Frobenius error of the compression verdict's rule (default 0.2)")
    parser.add_argument("--eigen-route", choices=("auto", "gram", "svd"), default="auto",
                        help="how the eigenvalues are computed: auto (fastest), gram (float64-exact), svd (the reference)")
    parser.add_argument("--weights-only", action="store_true",
                        help="read the .safetensors files of a model directory instead of loading the model")
    parser.add_argument("--activations", action="store_true",
                        help="also analyse representations on --data, and judge each layer's whitened spectrum on it "
                             "(the same sentences calibrate that verdict)")
    parser.add_argument("--data", default="builtin",
                        help="sentences to analyse with --activations: 'builtin' (built-in English sentences) or a text file, one sentence per line")
    parser.add_argument("--samples", type=int, default=512, help="sentences for --activations (default 512)")
    parser.add_argument("--hook", nargs="+", metavar="NAME",
                        help="modules whose outputs --activations analyses (any module, same syntax as --targets; "
                             "default: the model's blocks); --targets/--exclude select the weight table's matrices")
    parser.add_argument("--cka", action="store_true", help="with --activations, linear CKA between the hooked modules")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table", help="terminal output format")
    parser.add_argument("--output", "-o", help="write the --format output to this file instead of the terminal")
    parser.add_argument("--plots", metavar="DIR", help="write PNG figures into DIR")
    parser.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    parser.add_argument("--columns", nargs="+", help="columns of the terminal table")
    add_output_options(parser)
    parser.set_defaults(run=run)


def _weight_source(spec: str, weights_only: bool):
    """(source for analyze_weights, LoadedModel or None)."""
    path = Path(spec)
    if path.suffix == ".safetensors":
        return str(path), None
    if path.is_dir() and any(path.glob("*.safetensors")):
        if weights_only or not ((path / "config.json").exists() or (path / "modules.json").exists()):
            return str(path), None
    from ..models import load_model

    try:
        loaded = load_model(spec)
    except (ValueError, FileNotFoundError, ImportError, KeyError):
        raise
    except Exception as exc:  # unpickling, config and checkpoint errors of other libraries
        raise ValueError(f"cannot load the model {spec!r}: {type(exc).__name__}: {exc}") from exc
    return loaded.module, loaded


def _sentences(data: str, n: int) -> list[str]:
    if data == "builtin":
        from ..data import builtin_sentences

        sentences = builtin_sentences("topics")
    else:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"no data file at {data!r} (use 'builtin' or a text file with one sentence per line)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"--data {data}: not UTF-8 text ({exc})") from exc
        sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise ValueError(f"the data {data!r} holds no sentences")
    return sentences[:n]


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (TypeError, RuntimeError) as exc:  # torch errors from user input: one line, no traceback (main reports OSError)
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc


def _run(args: argparse.Namespace) -> int:
    from ..analysis.activations import analyze_activations
    from ..analysis.weights import analyze_weights
    from ..linalg import DEFAULT_VERDICT_ERROR
    from ..report.tables import print_table

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    check_outputs(files=(args.output, args.html, args.json))
    if args.plots:
        check_outputs(directories=(args.plots,), overwrite=True)
    from ..distributed import init_from_env

    group = init_from_env()  # under torchrun the ranks share the matrices; rank 0 reports
    progress = progress_option(args) and group.rank == 0
    sentences = _sentences(args.data, args.samples) if args.activations else None  # a bad --data is named before loading
    source, loaded = _weight_source(args.model, args.weights_only)
    if args.activations and loaded is None:
        raise ValueError("--activations needs a runnable model, not a weights-only .safetensors source")
    error = DEFAULT_VERDICT_ERROR if args.error is None else args.error
    weights = analyze_weights(
        loaded if loaded is not None else source, target_modules=target_spec(args.targets),
        exclude_modules=target_spec(args.exclude, "--exclude") or (),
        conv2d=args.conv2d, mp_fit=args.mp_fit, error=error, eigen_route=args.eigen_route, calibration=sentences,
        progress=progress,
    )
    activations = None
    if args.activations:
        activations = analyze_activations(loaded, sentences, target_spec(args.hook), cka=args.cka, progress=progress)
    if group.rank != 0:
        return 0
    if args.columns:
        unknown = [c for c in args.columns if c not in weights.columns]
        if unknown:
            raise ValueError(f"--columns: the weight table has no column {', '.join(map(repr, unknown))}; it has: {', '.join(weights.columns)}")
        args.columns = ["name", *(c for c in args.columns if c != "name")]  # rows without their names say nothing
    _emit(args, weights, activations, print_table)
    if args.json:
        write_json(args.json, _json_text(weights, activations))
    if args.plots or args.html:
        from ..report.figures import save_figures

        figures = None
        if args.plots:
            figures = save_figures(args.plots, weights, activations)
            print(f"wrote {len(figures)} figures to {args.plots}", file=sys.stderr)
        if args.html:
            from ..report.html import render_html, write_html

            subtitle = f"model {args.model}"
            if figures is not None:
                Path(args.html).parent.mkdir(parents=True, exist_ok=True)
                Path(args.html).write_text(render_html(weights, activations, figures, subtitle=subtitle), encoding="utf-8")
            else:
                write_html(args.html, weights, activations, subtitle=subtitle)
            print(f"wrote the HTML report to {args.html}", file=sys.stderr)
    return 0


def _json_text(weights, activations) -> str:
    import json

    payload = {"weights": weights.to_dict()}
    if activations is not None:
        payload["activations"] = activations.to_dict()
    return json.dumps(payload, indent=2)


def _emit(args, weights, activations, print_table) -> None:
    if args.format == "json":
        text = _json_text(weights, activations)
    elif args.format == "csv":
        text = weights.to_csv()
        if activations is not None:
            text += "\n" + activations.to_csv()
    else:
        text = None
    if text is not None:
        if args.output:
            Path(args.output).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        else:
            sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
        return
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        print_table(weights, args.columns, title=f"weights of {args.model} ({weights.meta['seconds']:.2f} s)", file=out)
        if activations is not None:
            print_table(activations, None, title=f"representations ({activations.meta['seconds']:.2f} s)", file=out)
    finally:
        if args.output:
            out.close()
