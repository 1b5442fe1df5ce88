"""``svdkit heal``: distil a compressed causal language model toward the dense model it came from.

Reads a directory written by ``svdkit compress`` (a causal LM), loads its dense source (the model
spec the directory records, or ``--dense``; checked to be that model: every tensor the compression
left untouched must be equal in both), trains the factors on the KL divergence of the next-token
distributions over built-in calibration windows (and, with ``--generated``, windows the dense model
writes itself; :mod:`svdkit.compression.distill`), and saves the
healed model like any compressed model (by default back into the directory). The run is
resumable: its state is written every ``--checkpoint-every`` steps to ``OUTPUT.heal-state.safetensors``
beside the output, and ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ._common import add_output_options, check_outputs, positive_int, progress_option, table_stream, write_json

WINDOWS, SEQ_LEN, HELD_OUT = 128, 256, 8


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "heal", help="distil a compressed causal LM toward its dense source (KL on the logits)",
        description="Train the factors of a compressed causal LM (a directory written by svdkit compress) to reproduce the "
                    "next-token distributions of the dense model it was compressed from, and save the result.",
    )
    parser.add_argument("directory", help="a compressed causal LM directory (written by svdkit compress)")
    parser.add_argument("-o", "--output", default=None, help="where to save the healed model (default: back into DIRECTORY)")
    parser.add_argument("--dense", default=None, help="the dense source model (default: the spec DIRECTORY records)")
    parser.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of Adam (default 5e-5)")
    parser.add_argument("--batch-windows", type=positive_int, default=4, help="windows per step (default 4)")
    parser.add_argument("--ce-weight", type=float, default=0.0, help="weight of the next-token loss beside the KL (default 0)")
    parser.add_argument("--calib", default="builtin", help="text of the windows: 'builtin', a calibration mix, a .txt or .pt file")
    parser.add_argument("--windows", type=positive_int, default=WINDOWS, help=f"training windows of --calib text (default {WINDOWS})")
    parser.add_argument("--generated", type=int, default=0,
                        help="also train on this many windows written by the dense model itself (sampled from its start token, "
                             "nucleus 0.95), kept in the resumable state (default 0)")
    parser.add_argument("--held-out", type=positive_int, default=HELD_OUT, help=f"windows never trained on, for the KL before/after (default {HELD_OUT})")
    parser.add_argument("--seq-len", type=positive_int, default=SEQ_LEN, help=f"tokens per window (default {SEQ_LEN})")
    parser.add_argument("--calib-seed", type=int, default=1, help="seed of the windows (default 1: other windows than compression's default 0)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=10, help="write the resumable state every this many steps (default 10)")
    parser.add_argument("--resume", action="store_true", help="continue the run whose state file is beside the output")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing svdkit output directory other than DIRECTORY")
    parser.add_argument("--no-eval", action="store_true", help="skip the perplexity before/after on the held-out domains")
    add_output_options(parser, json_help="also write the healing result as JSON to FILE ('-': standard output)")
    parser.set_defaults(run=run)


def state_file(output: Path) -> Path:
    """Where the resumable state of healing into ``output`` is kept."""
    return output.parent / f"{output.name}.heal-state.safetensors"


class _SavedReport:
    """The recorded report of the compressed directory, with the healing added (what save_compressed reads)."""

    def __init__(self, totals: dict[str, Any] | None, quality: dict[str, Any]) -> None:
        self._totals, self.quality = totals, quality

    def totals(self) -> dict[str, Any] | None:
        return self._totals


def _load_student(directory: Path):
    from ..compression.io import read_description
    from ..models import load_model

    meta = read_description(directory)  # not an svdkit directory, unfinished, damaged: its own message
    if not meta.get("layers"):
        raise ValueError(f"{directory} holds no factorized layers: there is nothing to heal")
    loaded = load_model(str(directory))
    if not loaded.is_causal_lm:
        raise ValueError(f"{directory} holds a {loaded.kind} model; svdkit heal distils causal language models (next-token logits)")
    if loaded.tokenizer is None:
        raise ValueError(f"{directory} holds no tokenizer: healing reads built-in text; save the compressed model with its tokenizer")
    return meta, loaded


def run(args: argparse.Namespace) -> int:
    from ..compression import save_compressed
    from ..compression.distill import HealConfig, check_heal_source, heal_language_model
    from ..compression.io import check_save_target
    from ..eval import language_model_quality, worst_ratio
    from ..models import load_model
    from ..tokens import calibration_tokens

    directory = Path(args.directory)
    output = Path(args.output) if args.output else directory
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.generated < 0:
        raise ValueError(f"--generated must be >= 0 (windows the dense model writes), got {args.generated}")
    config = HealConfig(steps=args.steps, lr=args.lr, batch_windows=args.batch_windows, held_out=args.held_out,
                        ce_weight=args.ce_weight, checkpoint_every=args.checkpoint_every, generated_windows=args.generated)
    check_outputs(files=(args.json,))
    if output.resolve() != directory.resolve():
        check_save_target(output, args.overwrite)
    state = state_file(output)
    if state.exists() and not args.resume:
        raise ValueError(f"{state} holds an unfinished healing run: pass --resume to continue it (same options), or remove it")
    if args.resume and not state.exists():
        raise ValueError(f"--resume: there is no healing state at {state} to continue")
    progress = progress_option(args)
    meta, student = _load_student(directory)
    source = args.dense or meta.get("source")
    if not source:
        raise ValueError(f"{directory} records no source model: pass the dense model it was compressed from with --dense")
    print(f"loading the dense model {source} ...", file=sys.stderr)
    teacher = load_model(source)
    check_heal_source(student.module, teacher.module, source=meta.get("source"))
    context = student.context_length or args.seq_len
    if args.seq_len > context:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context ({context} tokens)")
    windows = calibration_tokens(args.calib, student.tokenizer, n_seqs=args.windows + args.held_out, seq_len=args.seq_len,
                                 seed=args.calib_seed, vocab_size=student.vocab_size)
    before = None if args.no_eval else language_model_quality(student.module, student.tokenizer, progress=progress)
    written = f" (first sampling {args.generated} windows from the dense model)" if args.generated else ""
    print(f"healing {directory}: {args.steps} steps of {args.batch_windows} x {args.seq_len} tokens{written} ...", file=sys.stderr)
    result = heal_language_model(student.module, teacher.module, windows, config, state_path=state, progress=progress)
    quality = dict(meta.get("quality") or {})
    quality["healing"] = result.summary()
    if before is not None:
        after = language_model_quality(student.module, student.tokenizer, progress=progress)
        dense = language_model_quality(teacher.module, teacher.tokenizer or student.tokenizer, progress=progress)
        for domain in after:
            quality[f"ppl {domain} (dense -> compressed -> healed)"] = (
                f"{dense[domain]:.3f} -> {before[domain]:.3f} ({before[domain] / dense[domain]:.2f}x) -> "
                f"{after[domain]:.3f} ({after[domain] / dense[domain]:.2f}x)")
        worst, ratio = worst_ratio(after, dense)
        quality["worst ppl ratio"] = f"{ratio:.2f}x ({worst})"
    totals = dict(meta.get("report") or {})
    totals["healing"] = {"config": config.to_dict(), "calib": args.calib, "windows": args.windows, "seq_len": args.seq_len,
                         "calib_seed": args.calib_seed, **{k: v for k, v in result.to_dict().items() if k != "losses"},
                         "loss_first": result.losses[0], "loss_last": result.losses[-1]}
    save_compressed(student.module, output, source=meta.get("source") or source, config=meta.get("config"),
                    tokenizer=student.tokenizer, report=_SavedReport(totals, quality), overwrite=True, dtype=meta.get("dtype"))
    state.unlink(missing_ok=True)
    stream = table_stream(args)
    for key, value in quality.items():
        if key.startswith("ppl ") or key in ("healing", "worst ppl ratio"):
            print(f"{key}: {value}", file=stream)
    print(f"saved to {output} (load with svdkit.load_model({str(output)!r}))", file=stream)
    write_json(args.json, json.dumps(totals["healing"] | {"quality": quality}, indent=2, default=str))
    return 0
