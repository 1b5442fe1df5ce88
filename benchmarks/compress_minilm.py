"""Compress the pretrained all-MiniLM-L6-v2 at several parameter ratios with every method.

Calibration: 256 even-indexed sentences of ``pydoc_data.topics``. Evaluation: 512 odd-indexed
sentences of the same source, and 512 sentences of IDLE's manual and change log, a domain never
used for calibration. Quality is the mean cosine between the original and the compressed
sentence embeddings, and the overlap of each sentence's 10 nearest neighbours.

    python benchmarks/compress_minilm.py                       # the full table
    python benchmarks/compress_minilm.py --ratios 0.7 0.5 --configs whiten fisher-budget
    python benchmarks/compress_minilm.py --json results.json
    python benchmarks/compress_minilm.py --timing           # the default's time vs plain SVD, and a budget sweep
    python benchmarks/compress_minilm.py --probes-study --seeds 3   # the default's curvature: how many probes, which law
    python benchmarks/compress_minilm.py --probes-study --seeds 3 --output-damping 0.1
    python benchmarks/compress_minilm.py --damping-study --seeds 3 --output-damping 0.1   # 1e-2 against 0.1 at every budget
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from svdkit.batches import output_tensor
from svdkit.compression import CompressConfig, compress, embedding_agreement
from svdkit.data import builtin_sentences, calibration_sentences
from svdkit.linalg import ParamRatio
from svdkit.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_json  # noqa: E402

# name -> (method, global budget?, refit passes, layer-wise distillation steps)
CONFIGS = {
    "svd": ("svd", False, 0, 0),
    "asvd": ("asvd", False, 0, 0),
    "whiten": ("whiten", False, 0, 0),
    "fisher": ("fisher", False, 0, 0),
    "whiten-budget": ("whiten", True, 0, 0),
    "fisher-budget": ("fisher", True, 0, 0),
    "fisher-budget-refit": ("fisher", True, 1, 0),
    "fisher-budget-distill": ("fisher", True, 0, 100),
}
# The encoder's 36 Linear layers shape the sentence embedding; the BERT pooler does not.
TARGETS = r".*encoder.*"


def default_batches() -> list[list[str]]:
    """What `svdkit compress minilm` calibrates on: 256 built-in sentences in batches of 32."""
    texts = calibration_sentences(256)
    return [texts[i:i + 32] for i in range(0, len(texts), 32)]


def config_for(name: str, ratio: float) -> CompressConfig:
    method, budget, refit, distill_steps = CONFIGS[name]
    size = {"budget": ratio} if budget else {"rank": ParamRatio(ratio)}
    return CompressConfig(method=method, target_modules=TARGETS, refit=refit, layerwise_distill_steps=distill_steps, **size)


def latency_ratio(loaded, module, texts: list[str], repeats: int) -> tuple[float, float]:
    """Median seconds to embed ``texts`` in batches of 64 with the dense model and with ``module``,
    measured alternately so both see the same machine load; returns (dense, compressed)."""
    dense, compressed = [], []
    for _ in range(repeats):
        for model, times in ((loaded.module, dense), (module, compressed)):
            start = time.perf_counter()
            loaded.encode(texts, batch_size=64, module=model)
            times.append(time.perf_counter() - start)
    return statistics.median(dense), statistics.median(compressed)


def timing(loaded, repeats: int) -> dict:
    """What `svdkit compress minilm` spends compressing (its default: fisher, budget 0.6, 256
    calibration sentences, the encoder's layers), against plain SVD and SVD-LLM-style whitening
    (uniform ranks at 0.6 of the parameters) of the same layers on the same calibration, and a
    three-budget sweep against one budget; best of ``repeats``, timed alternately."""
    from svdkit.compression import compress_sweep

    batches = default_batches()
    default = CompressConfig(budget=0.6, target_modules=TARGETS)
    plain = CompressConfig(method="svd", budget=0.6, target_modules=TARGETS)
    whiten = CompressConfig(method="whiten", rank=ParamRatio(0.6), target_modules=TARGETS)
    runs = {
        "svd, budget 0.6": lambda: [compress(loaded.module, plain)],
        "whiten (SVD-LLM), 0.6": lambda: [compress(loaded.module, whiten, batches, forward=loaded.forward)],
        "default (fisher, budget 0.6)": lambda: [compress(loaded.module, default, batches, forward=loaded.forward)],
        "default, sweep 0.5/0.6/0.7": lambda: compress_sweep(loaded.module, default, [0.5, 0.6, 0.7], batches, forward=loaded.forward),
    }
    best = {name: float("inf") for name in runs}
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    held_out = builtin_sentences("topics", split="odd")[:512]
    reference = loaded.encode(held_out)
    rows = []
    for name, outputs in results.items():
        cosines = [embedding_agreement(reference, loaded.encode(held_out, module=m))["mean_cosine"] for m, _ in outputs]
        rows.append({"run": name, "seconds": best[name], "mean_cosine": cosines})
    base, whitened, one = best["svd, budget 0.6"], best["whiten (SVD-LLM), 0.6"], best["default (fisher, budget 0.6)"]
    print(f"{'run':<30} {'seconds':>8}  {'x svd':>6}  {'x whiten':>8}  {'x one budget':>12}  mean cosine (held-out)")
    for row in rows:
        print(f"{row['run']:<30} {row['seconds']:>8.2f}  {row['seconds'] / base:>6.2f}  {row['seconds'] / whitened:>8.2f}  "
              f"{row['seconds'] / one:>12.2f}  " + ", ".join(f"{c:.4f}" for c in row["mean_cosine"]))
    return {"rows": rows, "default_vs_svd": one / base, "default_vs_whiten": one / whitened,
            "sweep_vs_one": best["default, sweep 0.5/0.6/0.7"] / one}


def cosine_scorer(loaded) -> Callable[[torch.nn.Module], dict[str, float]]:
    """A function of a compressed copy of ``loaded.module``: the mean cosine of its embeddings to the
    dense ones on 512 held-out sentences of the calibration's source and 512 of IDLE's text."""
    texts = {"held-out": builtin_sentences("topics", split="odd")[:512], "other": builtin_sentences("idle")[:512]}
    reference = {label: loaded.encode(sentences) for label, sentences in texts.items()}
    return lambda module: {label: embedding_agreement(reference[label], loaded.encode(sentences, module=module))["mean_cosine"]
                           for label, sentences in texts.items()}


def rademacher_probes(result, batch, probes: int, generator: torch.Generator):
    """``z . f(x)`` for ``probes`` random sign vectors ``z``: the lowest-variance law of i.i.d. probes
    (Hutchinson), against the Gaussian probes of svdkit's ``"probes"`` estimate."""
    output = output_tensor(result)
    for _ in range(probes):
        z = torch.randint(0, 2, output.shape, generator=generator).mul_(2).sub_(1).to(output.dtype)
        yield (output * z.to(output.device)).sum()


def probes_study(loaded, seeds: int, output_damping: float) -> list[dict]:
    """The default (fisher, budget 0.6, 256 calibration sentences) with one and two output probes per
    batch, Gaussian and Rademacher, over ``seeds`` seeds of the probes: held-out cosine and seconds."""
    from svdkit.compression.curvature import register_curvature

    register_curvature("rademacher", default_probes=2)(rademacher_probes)
    batches, score = default_batches(), cosine_scorer(loaded)
    rows = []
    print(f"{'probes':<12} {'per batch':>9}  {'seed':>4}  {'seconds':>7}  {'cos':>6}  {'cos other':>9}")
    for law in ("probes", "rademacher"):
        for count in (1, 2):
            for seed in range(seeds):
                config = CompressConfig(budget=0.6, target_modules=TARGETS, curvature=law, probes=count, seed=seed,
                                        output_damping=output_damping)
                start = time.perf_counter()
                compressed, _ = compress(loaded.module, config, batches, forward=loaded.forward)
                seconds = time.perf_counter() - start
                cos = score(compressed)
                rows.append({"law": "gaussian" if law == "probes" else law, "probes": count, "seed": seed, "seconds": seconds,
                             "mean_cosine": cos["held-out"], "mean_cosine_other": cos["other"], "output_damping": output_damping})
                print(f"{rows[-1]['law']:<12} {count:>9}  {seed:>4}  {seconds:>7.1f}  {cos['held-out']:>6.4f}  {cos['other']:>9.4f}", flush=True)
    return rows


def damping_study(loaded, seeds: int, output_damping: float, budgets: list[float]) -> list[dict]:
    """The default (fisher, random output probes) with its output damping (1e-2) and with
    ``output_damping``, at every budget of ``budgets`` (one sweep, so one curvature pass, per
    damping and seed), over ``seeds`` seeds of the probes: held-out and IDLE cosine."""
    from svdkit.compression import compress_sweep

    batches, score = default_batches(), cosine_scorer(loaded)
    rows = []
    print(f"{'damping':>8}  {'seed':>4}  {'budget':>6}  {'cos':>6}  {'cos other':>9}")
    for seed in range(seeds):
        for damping in (CompressConfig().output_damping, output_damping):
            config = CompressConfig(target_modules=TARGETS, seed=seed, output_damping=damping)
            for budget, (compressed, _) in zip(budgets, compress_sweep(loaded.module, config, budgets, batches, forward=loaded.forward)):
                cos = score(compressed)
                rows.append({"output_damping": damping, "seed": seed, "budget": budget,
                             "mean_cosine": cos["held-out"], "mean_cosine_other": cos["other"]})
                print(f"{damping:>8g}  {seed:>4}  {budget:>6}  {cos['held-out']:>6.4f}  {cos['other']:>9.4f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--evaluation", type=int, default=512)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--latency-config", default="fisher-budget", choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--timing", action="store_true", help="only the compression time of the default vs plain SVD, and a sweep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probes-study", action="store_true", help="only the default's curvature with 1 and 2 Gaussian or Rademacher probes")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the probes in --probes-study and --damping-study")
    parser.add_argument("--damping-study", action="store_true", help="only the default with its output damping and with --output-damping, at every --ratios budget")
    parser.add_argument("--output-damping", type=float, default=1e-2, help="the fisher method's output damping in --probes-study and --damping-study")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probes_study:
        rows = probes_study(load_model("minilm"), args.seeds, args.output_damping)
        write_json(args.json, {"rows": rows, "threads": torch.get_num_threads()})
        return 0
    if args.damping_study:
        rows = damping_study(load_model("minilm"), args.seeds, args.output_damping, sorted(args.ratios))
        write_json(args.json, {"rows": rows, "threads": torch.get_num_threads()})
        return 0
    if args.timing:
        result = timing(load_model("minilm"), args.repeats)
        write_json(args.json, dict(result, threads=torch.get_num_threads()))
        return 0

    torch.manual_seed(0)
    loaded = load_model("minilm")
    calibration = builtin_sentences("topics", split="even")[: args.calibration]
    batches = [calibration[i:i + 32] for i in range(0, len(calibration), 32)]
    held_out = builtin_sentences("topics", split="odd")[: args.evaluation]
    other = builtin_sentences("idle")[: args.evaluation]
    reference = {"held-out": loaded.encode(held_out), "other domain": loaded.encode(other)}

    rows = []
    header = f"{'ratio':>5}  {'config':<20} {'kept':>5}  {'cos':>6}  {'top10':>6}  {'cos other':>9}  {'top10 other':>11}  {'secs':>6}  {'latency':>8}"
    print(header)
    print("-" * len(header))
    for ratio in args.ratios:
        for name in args.configs:
            start = time.perf_counter()
            compressed, report = compress(loaded.module, config_for(name, ratio), batches, forward=loaded.forward)
            seconds = time.perf_counter() - start
            quality = {}
            for label, texts in (("held-out", held_out), ("other domain", other)):
                quality[label] = embedding_agreement(reference[label], loaded.encode(texts, module=compressed))
            row = {
                "ratio": ratio, "config": name, "kept": report.kept_fraction, "seconds": seconds,
                "mean_cosine": quality["held-out"]["mean_cosine"], "top10_overlap": quality["held-out"]["neighbour_overlap"],
                "mean_cosine_other": quality["other domain"]["mean_cosine"],
                "top10_overlap_other": quality["other domain"]["neighbour_overlap"],
            }
            if name == args.latency_config:
                dense_s, compressed_s = latency_ratio(loaded, compressed, held_out, args.latency_repeats)
                row.update(latency_dense_seconds=dense_s, latency_seconds=compressed_s, latency_ratio=compressed_s / dense_s)
            rows.append(row)
            lat = f"{row['latency_ratio']:.2f}x" if "latency_ratio" in row else ""
            print(f"{ratio:>5.2f}  {name:<20} {row['kept']:>5.2f}  {row['mean_cosine']:>6.4f}  {row['top10_overlap']:>6.3f}  "
                  f"{row['mean_cosine_other']:>9.4f}  {row['top10_overlap_other']:>11.3f}  {seconds:>6.1f}  {lat:>8}", flush=True)
    print(f"\nlatency column: time to embed {len(held_out)} sentences in batches of 64, compressed / dense, "
          f"for {args.latency_config} (medians of {args.latency_repeats} alternating runs)")
    write_json(args.json, {"rows": rows, "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
