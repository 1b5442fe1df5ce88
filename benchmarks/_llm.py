"""SmolLM2-135M for the speed and Pareto benchmarks: compressed models cached in a directory (so a
run that needs one model in several dtypes, or a second run, does not compress again), and
perplexity on the in-domain and other-domain held-out texts.

The calibration follows ``compress_llm.py`` (``--calib-seqs`` windows of ``--seq-len`` tokens of
the built-in text, the curvature on ``--gradient-seqs`` of them, batches of 4) and the config is
``svdkit compress``'s default (fisher, global budget, block by block) with the fields given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

BATCH = 4
DOMAINS = (("ppl_in", "in-domain"), ("ppl_other", "other-domain"))


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib-seqs", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gradient-seqs", type=int, default=64)
    parser.add_argument("--eval-seqs", type=int, default=24, help="windows of 512 tokens scored per domain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cache", default="benchmarks/.cache/smollm2",
                        help="directory of the compressed models (svdkit's format, float32), reused when the settings match")


def load_smollm2(device: str):
    """The dense model (float32, eval mode) on ``device`` and its tokenizer."""
    from svdkit.models import load_model

    loaded = load_model("smollm2")
    return loaded.module.to(device).eval(), loaded.tokenizer


def compressed_smollm2(args: argparse.Namespace, **fields: Any):
    """SmolLM2 compressed with ``CompressConfig(**fields)`` on ``args.device`` (the speed caps of a
    speed-aware config are measured there, at ``args.threads``), loaded from ``args.cache`` when
    a model of the same settings is there, else compressed and saved there. Returns the model
    (float32, on ``args.device``) and the seconds compression took (None when read from the cache)."""
    import torch

    from svdkit import CompressConfig, compress
    from svdkit.compression import load_compressed, save_compressed
    from svdkit.tokens import calibration_tokens

    settings = {"fields": fields, "calib_seqs": args.calib_seqs, "seq_len": args.seq_len, "gradient_seqs": args.gradient_seqs,
                "device": args.device, "threads": args.threads}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    name = "-".join(f"{k}{v}" for k, v in sorted(fields.items())).replace("_", "")
    directory = Path(args.cache) / f"{name}-{key}"
    if (directory / "svdkit_compressed.json").exists():
        return load_compressed(directory).to(args.device).eval(), None
    model, tokenizer = load_smollm2(args.device)
    config = CompressConfig(gradient_batches=-(-args.gradient_seqs // BATCH), **fields)
    ids = calibration_tokens("builtin", tokenizer, n_seqs=args.calib_seqs, seq_len=args.seq_len, seed=0)
    print(f"compressing SmolLM2 with {fields} ...", file=sys.stderr)
    start = time.perf_counter()
    with torch.random.fork_rng():
        model, report = compress(model, config, list(ids.split(BATCH)), inplace=True)
    seconds = time.perf_counter() - start
    save_compressed(model, directory, source="smollm2", config=config, report=report, tokenizer=tokenizer, overwrite=True)
    (directory / "benchmark_settings.json").write_text(json.dumps(settings, indent=2))
    return model.eval(), seconds


def perplexities(model, tokenizer, eval_seqs: int) -> dict[str, float]:
    """Perplexity on the in-domain and other-domain held-out texts (``eval_seqs`` x 512 tokens each)."""
    from svdkit.eval import language_model_quality

    quality = language_model_quality(model, tokenizer, data=[domain for _, domain in DOMAINS], max_tokens=eval_seqs * 512)
    return {key: quality[domain] for key, domain in DOMAINS}
