"""Compress SmolLM2-135M (a real LLaMA-family LM) with every method, judged by perplexity.

The field's protocol (SVD-LLM, arXiv:2403.07378), on text that ships with Python: calibration on
``--calib-seqs`` random windows of ``--seq-len`` tokens of the built-in calibration text (even
pydoc topics and standard-library docstrings); perplexity over ``--eval-seqs`` x 512 tokens (or
as many as a domain holds) of every held-out domain: the odd pydoc topics ("in-domain"), IDLE's
manual and change log ("other domain"), Python's licence and the Apache License ("legal English",
about 10 windows) and mpmath's function documentation ("math docs"), never used for calibration,
and the worst ratio to dense. The ratio is the fraction of the decoder blocks' Linear parameters kept.

Every (config, ratio) runs in its own process, so its peak RSS is its own.

    python benchmarks/compress_llm.py                                   # the full table
    python benchmarks/compress_llm.py --ratios 0.8 --configs whiten default --json out.json
    python benchmarks/compress_llm.py --generation                      # + tokens/s, dense vs compressed
    python benchmarks/compress_llm.py --llama-block                     # one LLaMA-7B-shaped block
    python benchmarks/compress_llm.py --ratios 0.6 --configs default default-unrefined default-heal --tasks
    python benchmarks/compress_llm.py --calib 'pydoc+stdlib+networkx+torch' --configs default
    python benchmarks/compress_llm.py --ratios 0.8 --configs default-labels default-sampled --seed 1 --tasks

``--seed`` draws other calibration windows (and seeds the compression's own random draws): a
second seed tells a real difference between two configs from the draw of the windows.

``--tasks`` adds the zero-shot accuracy of ``svdkit.tasks`` (next-sentence, last-word; 200 items
each) beside the perplexities; ``default-heal`` reports its cost (tokens and seconds) apart from
the compression time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, machine_info, write_json  # noqa: E402

from svdkit.cli.compress import LM_REFINE_EPOCHS  # noqa: E402

# name -> (CompressConfig fields, uniform ranks?)
CONFIGS: dict[str, tuple[dict[str, Any], bool]] = {
    "svd": ({"method": "svd"}, True),
    "asvd": ({"method": "asvd", "pipeline": "model"}, True),
    "whiten": ({"method": "whiten", "pipeline": "model"}, True),  # the SVD-LLM reproduction
    "whiten-budget": ({"method": "whiten", "pipeline": "model"}, False),
    "fisher-probes-budget": ({"method": "fisher", "curvature": "probes", "pipeline": "model"}, False),  # svdkit 0.1's default
    "fisher-labels": ({"method": "fisher", "curvature": "labels", "pipeline": "blocks"}, True),
    "fisher-labels-budget-model": ({"method": "fisher", "curvature": "labels", "pipeline": "model"}, False),
    # what svdkit compress does: fisher, LM curvature, budget, block by block, each block refined
    "default": ({"refine_epochs": LM_REFINE_EPOCHS}, False),
    # the same without block refinement (svdkit compress --refine-epochs 0; the default before it);
    # the variants below are of this one, as they were measured
    "default-unrefined": ({}, False),
    # its curvature chosen: the true Fisher (next tokens sampled from the model, one per
    # position) or the empirical Fisher (the text's next tokens: the default)
    "default-sampled": ({"curvature": "sampled", "probes": 1}, False),
    "default-labels": ({"curvature": "labels"}, False),
    # the curvature shrunk further toward the identity (output damping 1e-2 by default)
    "default-output-damping-0.1": ({"output_damping": 0.1}, False),
    "default-output-damping-1": ({"output_damping": 1.0}, False),
    # both of the above that help at light compression, together
    "default-sampled-output-damping-0.1": ({"curvature": "sampled", "probes": 1, "output_damping": 0.1}, False),
    # block refinement with up to 8 epochs toward the dense block's outputs on the dense inputs (AA-SVD's
    # anchor, as the default) or on the compressed inputs
    "default-refine-8": ({"refine_epochs": 8}, False),
    "default-refine-shifted": ({"refine_epochs": 8, "refine_target": "shifted"}, False),
    # without refinement, then --heal-steps of distillation toward the dense model (KL on the logits)
    "default-heal": ({}, False),
}
DEFAULT_CONFIGS = ("svd", "asvd", "whiten", "whiten-budget", "fisher-probes-budget", "fisher-labels", "default")
BATCH = 4
# (row key, evaluation domain, column title): perplexity on every held-out domain
DOMAINS = (("ppl_in", "in-domain", "in-domain"), ("ppl_other", "other-domain", "other domain"),
           ("ppl_legal", "legal-english", "legal English"), ("ppl_math", "math-docs", "math docs"))


def _peak_rss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB


def _generation_speed(model, tokenizer, batch: int, new_tokens: int, repeats: int) -> float:
    """Best tokens per second of greedy generation of ``new_tokens`` for ``batch`` prompts."""
    import torch

    prompts = ["The for statement in Python"] * batch
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
            best = min(best, time.perf_counter() - start)
    return batch * new_tokens / best


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One (config, ratio): load, calibrate, compress, measure. Runs in its own process."""
    import torch

    from svdkit import CompressConfig, compress
    from svdkit.eval import language_model_quality
    from svdkit.linalg import ParamRatio
    from svdkit.models import load_model
    from svdkit.tokens import calibration_tokens

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")
    row: dict[str, Any] = {"config": args.config, "ratio": args.ratio}
    module = loaded.module
    if args.config != "dense":
        fields, uniform = CONFIGS[args.config]
        fields = dict(fields)
        fields["rank" if uniform else "budget"] = ParamRatio(args.ratio) if uniform else args.ratio
        fields.setdefault("gradient_batches", -(-args.gradient_seqs // BATCH))
        fields.setdefault("seed", args.seed)
        config = CompressConfig(**fields)
        calibration = None
        if config.needs_data:
            ids = calibration_tokens(args.calib, loaded.tokenizer, n_seqs=args.calib_seqs, seq_len=args.seq_len, seed=args.seed)
            calibration = list(ids.split(BATCH))
        start = time.perf_counter()
        # In place, as `svdkit compress` does: memory holds one model.
        module, report = compress(loaded.module, config, calibration, inplace=True)
        row["seconds"] = time.perf_counter() - start
        row["pipeline"] = report.pipeline
        row["kept"] = report.kept_fraction
        row["timings"] = report.timings
        if report.refinement:
            row["refined_blocks"] = sum(r["best_epoch"] > 0 for r in report.refinement)
        if args.config == "default-heal":
            row.update(_heal(module, loaded, args))
    row["peak_rss_gib"] = _peak_rss()
    quality = language_model_quality(module, loaded.tokenizer, max_tokens=args.eval_seqs * 512)
    row.update({key: quality[domain] for key, domain, _ in DOMAINS})
    if args.tasks:
        from svdkit.tasks import task_accuracy

        for name, scored in task_accuracy(module, loaded.tokenizer).items():
            row[f"acc_{name}"], row[f"acc_norm_{name}"], row[f"acc_stderr_{name}"] = scored.acc, scored.acc_norm, scored.acc_stderr
    if args.generation:
        dense = load_model("smollm2").module
        for batch in (1, 8):
            row[f"dense_tok_s_b{batch}"] = _generation_speed(dense, loaded.tokenizer, batch, 32, 3)
            row[f"tok_s_b{batch}"] = _generation_speed(module, loaded.tokenizer, batch, 32, 3)
    return row


def _heal(module, loaded, args: argparse.Namespace) -> dict[str, Any]:
    """Distil the compressed ``module`` toward the dense model on calibration windows other than those
    it was compressed with (``--heal-steps`` steps); its cost and held-out KL."""
    from svdkit.compression.distill import HealConfig, heal_language_model
    from svdkit.models import load_model
    from svdkit.tokens import calibration_tokens

    config = HealConfig(steps=args.heal_steps)
    windows = calibration_tokens(args.calib, loaded.tokenizer, n_seqs=args.heal_windows + config.held_out, seq_len=args.seq_len, seed=args.seed + 1)
    healed = heal_language_model(module, load_model("smollm2").module, windows, config)
    return {"heal_steps": healed.steps, "heal_tokens": healed.tokens, "heal_seconds": healed.seconds,
            "heal_kl_before": healed.held_out_kl_before, "heal_kl_after": healed.held_out_kl_after}


def llama_block(args: argparse.Namespace) -> dict[str, Any]:
    """Time and memory of the block pipeline on one LLaMA-7B-shaped decoder block (random weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from svdkit import CompressConfig, compress

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=1024, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    seqs, length = args.block_seqs, args.block_seq_len
    ids = torch.randint(0, 1024, (seqs, length), generator=torch.Generator().manual_seed(0))
    batches = list(ids.split(1))
    block_params = sum(p.numel() for p in model.model.layers.parameters())  # dense; compressed in place below
    start = time.perf_counter()
    _, report = compress(model, CompressConfig(budget=0.8, pipeline="blocks", gradient_batches=max(1, seqs // 2)), batches, inplace=True)
    seconds = time.perf_counter() - start
    tokens = seqs * length
    return {"tokens": tokens, "gradient_tokens": max(1, seqs // 2) * length, "seconds": seconds, "timings": report.timings,
            "peak_rss_gib": _peak_rss(), "block_params": block_params,
            "compressed_block_params": sum(p.numel() for p in model.model.layers.parameters())}


def _spawn(argv: list[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {argv} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=sorted(CONFIGS))
    parser.add_argument("--calib-seqs", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gradient-seqs", type=int, default=64)
    parser.add_argument("--eval-seqs", type=int, default=24)
    parser.add_argument("--calib", default="builtin", help="calibration text: 'builtin' or a mix of svdkit.corpus sources")
    parser.add_argument("--heal-steps", type=int, default=200, help="distillation steps of the default-heal config")
    parser.add_argument("--heal-windows", type=int, default=256, help="calibration windows default-heal trains on")
    parser.add_argument("--tasks", action="store_true", help="also score the zero-shot tasks (accuracy, normalized accuracy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and of the compression (CompressConfig.seed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generation", action="store_true", help="tokens/s of greedy generation, dense vs compressed, at 0.8 for the default")
    parser.add_argument("--llama-block", action="store_true", help="also time one LLaMA-7B-shaped block")
    parser.add_argument("--block-seqs", type=int, default=4)
    parser.add_argument("--block-seq-len", type=int, default=512)
    parser.add_argument("--json", help="write the rows and the machine description here")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RATIO"), help=argparse.SUPPRESS)
    parser.add_argument("--block-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.config, args.ratio = args.worker[0], float(args.worker[1])
        print(json.dumps(worker(args)))
        return 0
    if args.block_worker:
        print(json.dumps(llama_block(args)))
        return 0
    common = ["--calib-seqs", str(args.calib_seqs), "--seq-len", str(args.seq_len), "--gradient-seqs", str(args.gradient_seqs),
              "--eval-seqs", str(args.eval_seqs), "--threads", str(args.threads), "--calib", args.calib, "--seed", str(args.seed),
              "--heal-steps", str(args.heal_steps), "--heal-windows", str(args.heal_windows), *(["--tasks"] if args.tasks else [])]
    rows = [_spawn(["--worker", "dense", "1.0", *common], args.threads)]
    dense = rows[0]
    print("dense: " + ", ".join(f"ppl {title} {dense[key]:.3f}" for key, _, title in DOMAINS), file=sys.stderr)
    for ratio in args.ratios:
        for name in args.configs:
            extra = ["--generation"] if args.generation and name == "default" and abs(ratio - 0.8) < 1e-9 else []
            row = _spawn(["--worker", name, str(ratio), *common, *extra], args.threads)
            row.update({f"{key}_x": row[key] / dense[key] for key, _, _ in DOMAINS})
            row["worst_x"] = max(row[f"{key}_x"] for key, _, _ in DOMAINS)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    columns = [("config", "config", ""), ("ratio", "kept", ".1f"), ("pipeline", "pipeline", ""),
               *[c for key, _, title in DOMAINS for c in ((key, f"ppl {title}", ".2f"), (f"{key}_x", "x dense", ".2f"))],
               ("worst_x", "worst x", ".2f"), ("seconds", "compress s", ".0f"), ("peak_rss_gib", "peak RSS GiB", ".2f")]
    if args.tasks:
        columns += [c for task in ("next-sentence", "last-word") for c in ((f"acc_{task}", f"acc {task}", ".3f"),
                                                                          (f"acc_norm_{task}", "acc_norm", ".3f"))]
    print(format_table(rows, columns))
    for r in rows:
        if "heal_seconds" in r:
            print(f"healing ({r['config']} at {r['ratio']}): {r['heal_steps']} steps, {r['heal_tokens']:,} tokens, "
                  f"{r['heal_seconds']:.0f} s; held-out KL {r['heal_kl_before']:.4f} -> {r['heal_kl_after']:.4f}")
    speed = [r for r in rows if "tok_s_b8" in r]
    for r in speed:
        print(f"\ngeneration, tokens/s ({r['config']} at {r['ratio']}): batch 1 {r['tok_s_b1']:.1f} vs dense {r['dense_tok_s_b1']:.1f}; "
              f"batch 8 {r['tok_s_b8']:.1f} vs dense {r['dense_tok_s_b8']:.1f}")
    block = None
    if args.llama_block:
        block = _spawn(["--block-worker", "--threads", str(args.threads), "--block-seqs", str(args.block_seqs),
                        "--block-seq-len", str(args.block_seq_len)], args.threads)
        print(f"\nLLaMA-7B-shaped block: {block}")
    if args.json:
        write_json(args.json, {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k not in ("worker",)},
                               "rows": rows, "llama_block": block})
    return 0


if __name__ == "__main__":
    sys.exit(main())
