"""Past one machine's memory and one process: streaming from disk, torchrun, and per-block costs.

Three measurements, each in fresh processes so that peak memory is the run's own, and a projection:

``--memory``     a synthetic LLaMA-shaped checkpoint (random weights, sharded safetensors) of N
                 and 2N blocks, compressed by ``svdkit compress --stream`` (one block in memory)
                 and, for contrast, loaded whole and compressed in memory: peak RSS of each.
``--processes``  SmolLM2 at 0.8 with the default: one process with 2 threads, one with 1 thread,
                 and ``torchrun --nproc_per_node=2`` with 1 thread each (gloo): wall time, peak
                 RSS per process, and whether the outputs agree.
``--costs``      the costs a plan for large models is made of, measured here: a forward of one
                 LLaMA-7B-shaped block per token, Gram accumulation per token for the input widths
                 4096 / 11008 / 14336 / 28672, the factorization (the smaller Gram's eigensolve) of
                 each weight shape of LLaMA-7B, LLaMA-3-8B and a 70B model, and the bytes a block's
                 statistics put on the wire.
``--plan``       from those costs, the projected time and per-GPU memory of LLaMA-7B, LLaMA-3-8B and
                 a 70B model (the GPU's rates are assumptions, given as options).

    python benchmarks/scale.py --memory --blocks 4 --json memory.json
    python benchmarks/scale.py --processes --json processes.json
    python benchmarks/scale.py --costs --json costs.json
    python benchmarks/scale.py --plan costs.json             # 7B / 8B / 70B on this CPU and on 1, 8, 16 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, machine_info, write_json  # noqa: E402


def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


_PEAK = "import resource, sys; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, file=sys.stderr)"


def _peak_of(command: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of a Python snippet run in its own process."""
    code = command + "\n" + _PEAK
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the measured process failed:\n{done.stderr[-3000:]}")
    peak = float([line for line in done.stderr.splitlines() if line.startswith("PEAK")][-1].split()[1])
    return time.perf_counter() - start, peak


_WRITE_CHECKPOINT = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
blocks, folder, hidden, mlp = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, tie_word_embeddings=True)
LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="64MB")
"""

_STREAM = """
import sys, torch
from svdkit import CompressConfig
from svdkit.compression import compress_to_directory
torch.set_num_threads(2)
ids = torch.randint(0, 1024, (16, 128), generator=torch.Generator().manual_seed(0))
compress_to_directory(sys.argv[1], sys.argv[2], CompressConfig(budget=0.8, gradient_batches=2), list(ids.split(4)))
"""

_IN_MEMORY = """
import sys, torch
from transformers import AutoModelForCausalLM
from svdkit import CompressConfig, compress
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.randint(0, 1024, (16, 128), generator=torch.Generator().manual_seed(0))
compress(model, CompressConfig(budget=0.8, gradient_batches=2), list(ids.split(4)), inplace=True)
"""


def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for blocks in (args.blocks, 2 * args.blocks):
            folder = Path(scratch) / f"ckpt-{blocks}"
            _run([sys.executable, "-c", _WRITE_CHECKPOINT, str(blocks), str(folder), str(args.hidden), str(args.mlp)])
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
            stream_s, stream_peak = _peak_of(_STREAM, str(folder), str(Path(scratch) / f"out-{blocks}"))
            memory_s, memory_peak = _peak_of(_IN_MEMORY, str(folder))
            rows.append({"blocks": blocks, "checkpoint_gib": size, "stream_peak_gib": stream_peak, "stream_s": stream_s,
                         "in_memory_peak_gib": memory_peak, "in_memory_s": memory_s})
            print(json.dumps(rows[-1]), file=sys.stderr)
    rows[1]["stream_peak_vs_half"] = rows[1]["stream_peak_gib"] / rows[0]["stream_peak_gib"]
    print(format_table(rows, [("blocks", "blocks", ""), ("checkpoint_gib", "checkpoint GiB", ".2f"),
                              ("stream_peak_gib", "peak RSS, --stream", ".2f"), ("in_memory_peak_gib", "peak RSS, in memory", ".2f"),
                              ("stream_s", "s, --stream", ".0f"), ("in_memory_s", "s, in memory", ".0f")]))
    print(f"\npeak RSS of --stream with {rows[1]['blocks']} blocks / {rows[0]['blocks']} blocks: {rows[1]['stream_peak_vs_half']:.3f}")
    return rows


_SMOL = ["compress", "smollm2", "--params", "0.8", "--no-eval", "--no-progress", "--overwrite"]


def processes(args: argparse.Namespace) -> list[dict[str, Any]]:
    from safetensors.torch import load_file

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        runs = [("1 process x 2 threads", [sys.executable, "-m", "svdkit"], "2"),
                ("1 process x 1 thread", [sys.executable, "-m", "svdkit"], "1"),
                ("2 processes x 1 thread", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "svdkit"], "1")]
        outputs = {}
        for label, launcher, threads in runs:
            out = Path(scratch) / label.replace(" ", "_")
            env = dict(os.environ, OMP_NUM_THREADS=threads)
            report = Path(scratch) / f"{out.name}.json"
            seconds, _ = _run([*launcher, *_SMOL, "-o", str(out), "--json", str(report)], env)
            totals = json.loads(report.read_text())["totals"]
            outputs[label] = load_file(out / "model.safetensors")
            rows.append({"run": label, "wall_s": seconds, "compress_s": totals["seconds"], "curvature_s": totals["timings"].get("curvature"),
                         "compression_s": totals["timings"].get("compression"), "peak_rss_gib": (totals["peak_memory"] or 0) / 2**30})
            print(json.dumps(rows[-1]), file=sys.stderr)
        reference = outputs["1 process x 2 threads"]
        for row in rows:
            got = outputs[row["run"]]
            same_shapes = got.keys() == reference.keys() and all(got[k].shape == v.shape for k, v in reference.items())
            # another shape means other ranks: not the same result at all
            row["max_rel_diff"] = (max(float((got[k] - v).norm() / v.norm().clamp_min(1e-30)) for k, v in reference.items())
                                   if same_shapes else float("inf"))
    base = rows[1]["compress_s"]
    for row in rows:
        row["speedup_vs_1x1"] = base / row["compress_s"]
    print(format_table(rows, [("run", "run", ""), ("compress_s", "compress s", ".0f"), ("curvature_s", "curvature s", ".0f"),
                              ("compression_s", "compression s", ".0f"), ("peak_rss_gib", "peak RSS GiB (rank 0)", ".2f"),
                              ("speedup_vs_1x1", "speed-up vs 1x1", ".2f"), ("max_rel_diff", "max rel. diff of factors", ".1e")]))
    return rows


def costs(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {}
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    block = LlamaDecoderLayer(config, 0).eval()
    rotary = LlamaRotaryEmbedding(config)
    tokens = 512
    x = torch.randn(1, tokens, 4096)
    position = torch.arange(tokens)[None]
    embeddings = rotary(x, position)
    with torch.no_grad():
        block(x, position_embeddings=embeddings)
        start = time.perf_counter()
        block(x, position_embeddings=embeddings)
        out["block_forward_s_per_token"] = (time.perf_counter() - start) / tokens
    for width in (4096, 11008, 14336, 28672):
        X = torch.randn(2048, width)
        X.T @ X
        start = time.perf_counter()
        gram = (X.T @ X).double()
        del gram
        out[f"gram_s_per_token_{width}"] = (time.perf_counter() - start) / 2048
    shapes = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "1024x4096 (GQA k/v)": (1024, 4096),
              "14336x4096": (14336, 4096), "8192x8192": (8192, 8192), "28672x8192": (28672, 8192)}
    for label, (m, n) in shapes.items():
        side = min(m, n)
        if side > args.max_side:
            continue
        G = torch.randn(side, side, dtype=torch.float64)
        G = G @ G.T
        start = time.perf_counter()
        torch.linalg.eigh(G)
        out[f"factorize_s_{label}"] = time.perf_counter() - start
    # A block's statistics on the wire (float64 Grams, all-reduced once per pass).
    for name, (inputs, outputs) in {"llama-7b": ((4096, 4096, 4096, 11008), (4096, 4096, 4096, 4096, 11008, 11008, 4096)),
                                    "llama-3-8b": ((4096, 4096, 4096, 14336), (4096, 1024, 1024, 4096, 14336, 14336, 4096)),
                                    "70b": ((8192, 8192, 8192, 28672), (8192, 1024, 1024, 8192, 28672, 28672, 8192))}.items():
        out[f"allreduce_bytes_per_block_{name}"] = 8 * (sum(d * d for d in inputs) + sum(d * d for d in outputs))
    for key, value in out.items():
        print(f"{key}: {value:.4g}")
    return out


# name -> (blocks, hidden, MLP width, key/value width)
_PLAN_MODELS = {"LLaMA-7B": (32, 4096, 11008, 4096), "LLaMA-3-8B": (32, 4096, 14336, 1024), "70B (LLaMA-3-70B shape)": (80, 8192, 28672, 1024)}


def _block_shape(hidden: int, mlp: int, kv: int) -> dict[str, Any]:
    """One decoder block's weights (out, in) and the widths of its input and output Grams."""
    weights = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
               "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}
    inputs = (hidden, hidden, hidden, mlp)  # q/k/v share one input, gate/up another
    return {"weights": weights, "params": sum(m * n for m, n in weights.values()),
            "input_entries": sum(d * d for d in inputs), "output_entries": sum(m * m for m, _ in weights.values())}


def plan(costs: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Wall time and memory of compressing large models, projected from the costs measured here.

    FLOPs per block: forward 2 * params per token (+ attention 4 * seq * hidden), in both passes over
    the calibration tokens; the curvature pass adds, per gradient token, the block's share of one
    backward pass through the model (2x its forward, plus that forward) and the output-gradient
    Grams; both passes accumulate the input Grams. The head and embeddings are left out. Factorization: one float64 eigensolve of each layer's smaller side
    (measured here for these sides). This machine's rate is its measured float32 Gram product; a
    GPU's is ``--gpu-tflops`` and its eigensolves ``--gpu-eigh-speedup`` times this machine's
    (assumptions, not measurements). Statistics are float64 and all-reduced once per block and pass
    (ring: 2x the bytes over ``--link-gbps``); every rank holds a block's statistics in full.
    """
    rate = 2 * 4096 ** 2 / costs["gram_s_per_token_4096"]  # FLOP/s of a float32 Gram product here
    eigh = {}  # smaller side -> seconds of its float64 eigensolve here
    for key, seconds in costs.items():
        if key.startswith("factorize_s_"):
            m, n = map(int, key.removeprefix("factorize_s_").split()[0].split("x"))
            eigh[min(m, n)] = seconds
    rows = []
    tokens, gradient_tokens, seq = args.plan_tokens, args.plan_gradient_tokens, 2048
    for name, (blocks, hidden, mlp, kv) in _PLAN_MODELS.items():
        shape = _block_shape(hidden, mlp, kv)
        forward = 2 * shape["params"] + 4 * seq * hidden
        # per block: two forward passes, one backward (+ its forward) per gradient token, the Grams
        flops = blocks * (2 * tokens * forward + gradient_tokens * 3 * forward
                          + 2 * tokens * 2 * shape["input_entries"] + gradient_tokens * 2 * shape["output_entries"])
        sides = [min(m, n) for m, n in shape["weights"].values()]
        if not all(side in eigh for side in sides):
            continue
        factorize_here = blocks * sum(eigh[side] for side in sides)
        statistics_bytes = 8 * (shape["input_entries"] + shape["output_entries"])
        for gpus in (0, 1, 8, 16):
            if gpus == 0:  # this machine, one process
                seconds = flops / rate + factorize_here
                per_device = None
            else:
                compute = flops / (args.gpu_tflops * 1e12) / gpus
                largest = max(eigh[side] for side in sides) / args.gpu_eigh_speedup
                factorize = blocks * max(sum(eigh[side] for side in sides) / args.gpu_eigh_speedup / gpus, largest)
                wire = 0.0 if gpus == 1 else blocks * 2 * 2 * statistics_bytes / (args.link_gbps * 1e9)
                seconds = compute + factorize + wire
                activations = 2 * (tokens / gpus) * hidden * 2  # a block's inputs and outputs, bfloat16
                per_device = (4 * shape["params"] + statistics_bytes + activations) / 2**30
            rows.append({"model": name, "devices": "this CPU" if gpus == 0 else f"{gpus} GPU", "pflop": flops / 1e15,
                         "hours": seconds / 3600, "seconds": seconds, "per_device_gib": per_device,
                         "fits_80gb": None if per_device is None else per_device < 80e9 / 2**30})  # 80 GB = 74.5 GiB
    print(f"\nplan: {tokens:,} calibration tokens, {gradient_tokens:,} gradient tokens; this machine {rate / 1e9:.0f} GFLOP/s; "
          f"assumed GPU {args.gpu_tflops:g} TFLOP/s, eigensolves {args.gpu_eigh_speedup:g}x this machine's, links {args.link_gbps:g} GB/s")
    print(format_table(rows, [("model", "model", ""), ("devices", "devices", ""), ("pflop", "PFLOP", ".2f"), ("seconds", "projected s", ".0f"),
                              ("hours", "h", ".2f"), ("per_device_gib", "GiB per GPU", ".1f"), ("fits_80gb", "fits 80 GB", "")]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--processes", action="store_true")
    parser.add_argument("--costs", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-side", type=int, default=8192, help="skip eigensolves larger than this")
    parser.add_argument("--plan", metavar="COSTS_JSON", nargs="?", const="", default=None,
                        help="project large models from the costs of this run (with --costs) or of an earlier --costs JSON")
    parser.add_argument("--plan-tokens", type=int, default=256 * 2048, help="calibration tokens (SVD-LLM: 256 x 2048)")
    parser.add_argument("--plan-gradient-tokens", type=int, default=64 * 2048, help="tokens of the curvature pass")
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="assumed sustained matrix-product rate of one GPU")
    parser.add_argument("--gpu-eigh-speedup", type=float, default=20.0, help="assumed float64 eigensolve speed-up of one GPU over this machine")
    parser.add_argument("--link-gbps", type=float, default=100.0, help="assumed all-reduce bandwidth per GPU, GB/s")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not (args.memory or args.processes or args.costs or args.plan is not None):
        parser.error("choose --memory, --processes, --costs and/or --plan")
    results: dict[str, Any] = {"machine": machine_info()}
    if args.memory:
        results["memory"] = memory(args)
    if args.processes:
        results["processes"] = processes(args)
    if args.costs:
        results["costs"] = costs(args)
    if args.plan is not None:
        if args.plan:
            measured = json.loads(Path(args.plan).read_text())["costs"]
        elif args.costs:
            measured = results["costs"]
        else:
            parser.error("--plan needs --costs in the same run or the JSON of an earlier --costs run")
        results["plan"] = plan(measured, args)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
