"""What is the best SmolLM2 in N bytes? Low rank and weight quantization on one Pareto front.

Points: the dense model and svdkit's compressions at ``--budgets`` (the fraction of the decoder
blocks' parameters kept; ``svdkit compress``'s default config with every rank a multiple of the
int4 group size, so that int4 quantizes every factor), each in every ``--dtypes``:

- ``float32``, ``bfloat16``: the weights (and activations) in that dtype;
- ``int8``: torchao weight-only int8 (one scale per output row) of every Linear weight and factor,
  float32 activations;
- ``int4``: torchao's CPU weight-only int4 (groups of ``--group-size``, default 32), float32
  activations (CPU only).

Caveat on int4: the bundled SmolLM2 is a ``Q4_1`` GGUF file (4-bit affine, blocks of 32), loaded
dequantized: its dense weights already lie on a 4-bit grid per block of 32, so int4 in groups of
32 re-quantizes the dense model almost losslessly (logits within ~2e-6 of float32), which a
model trained in 16 bits would not allow; svdkit's factors are not on that grid and pay the
full int4 error. ``--group-size 64`` or ``128`` takes groups that straddle the file's blocks.

The tied input embedding / output head stays in float32 under int8 and int4 (torchao's
weight-only kernels take Linear weights; quantizing the head alone would untie it). For each
point: the bytes of all its weights (every parameter and buffer once, a quantized weight by its
data, scales and zero points), perplexity in-domain and on the other domain, and greedy decode
tokens/s at batch 1 (``--new-tokens`` after a ``--prompt-tokens`` prompt), timed interleaved with
the dense float32 model, whose speed is the ``x dense`` reference. A point is on the front when no
other point has fewer bytes and a lower perplexity (per domain).

Compressed models are cached in ``--cache`` (float32, svdkit's format): each is compressed once
and converted to every dtype from there.

    python benchmarks/pareto_llm.py --threads 2 --json pareto.json --figure pareto.png
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, machine_info, write_json  # noqa: E402
from _llm import add_model_options, compressed_smollm2, load_smollm2, perplexities  # noqa: E402

DTYPES = ("float32", "bfloat16", "int8", "int4")


def in_dtype(model, dtype: str, group_size: int):
    """``model`` (float32) in ``dtype``: cast, or weight-only quantized in place."""
    import torch

    from svdkit.quantization import quantize_weights

    if dtype in ("float32", "bfloat16", "float16"):
        return model.to(getattr(torch, dtype))
    quantized, _ = quantize_weights(model, dtype, group_size=group_size if dtype == "int4" else None, inplace=True)
    return quantized


def on_front(rows: list[dict[str, Any]], key: str) -> None:
    """Mark ``front_<key>`` on the rows no other row beats on bytes and ``key`` at once."""
    for row in rows:
        row[f"front_{key}"] = not any(other is not row and other["bytes"] <= row["bytes"] and other[key] <= row[key]
                                      and (other["bytes"], other[key]) != (row["bytes"], row[key]) for other in rows)


def figure(rows: list[dict[str, Any]], path: str) -> str:
    """Bytes against perplexity, one panel per domain; or why no figure was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no figure: matplotlib is not installed (pip install matplotlib)"
    markers = {"float32": "o", "bfloat16": "s", "int8": "^", "int4": "v"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, title) in zip(axes, (("ppl_in", "in-domain"), ("ppl_other", "other domain"))):
        for family, color in (("dense", "black"), ("svdkit", "tab:blue")):
            for dtype, marker in markers.items():
                points = [r for r in rows if r["family"] == family and r["dtype"] == dtype]
                if points:
                    ax.scatter([r["bytes"] / 2**20 for r in points], [r[key] for r in points], marker=marker, color=color,
                               label=f"{family} {dtype}")
        front = sorted((r for r in rows if r[f"front_{key}"]), key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / 2**20 for r in front], [r[key] for r in front], color="tab:red", lw=1, label="front")
        for r in rows:
            if r["family"] == "svdkit":
                ax.annotate(f"{r['budget']}", (r["bytes"] / 2**20, r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("weight bytes (MiB)")
        ax.set_ylabel(f"perplexity, {title}")
        ax.set_title(f"SmolLM2-135M: bytes vs perplexity ({title})")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return f"figure: {path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--speed-aware", choices=("auto", "on", "off"), default="auto",
                        help="the compressions' speed-aware ranks (default: svdkit's, on for a causal LM with a budget)")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32,
                        help="int4's group (every rank is a multiple of it, for all dtypes)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the rows and the machine description here")
    parser.add_argument("--figure", default=None, help="write the figure here (PNG)")
    add_model_options(parser)
    args = parser.parse_args(argv)

    import torch

    from svdkit.quantization import check_platform, required_rank_multiple, weight_bytes
    from svdkit.speed import generation_speed

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    rank_multiple = required_rank_multiple("int4", args.group_size)  # a factor's input size is its rank
    dtypes = []
    for dtype in args.dtypes:  # a mode without a kernel here is left out, and said so
        if dtype in ("int8", "int4"):
            try:
                check_platform(dtype, args.device, torch.float32, args.group_size if dtype == "int4" else None)
            except ValueError as exc:
                print(f"leaving out {dtype}: {exc}", file=sys.stderr)
                continue
        dtypes.append(dtype)
    reference, tokenizer = load_smollm2(args.device)  # dense float32: the speed reference of every point
    sources = [("dense", 1.0)] + [("svdkit", budget) for budget in args.budgets]
    for _, budget in sources[1:]:  # compress (or find in the cache) before any timing
        compressed_smollm2(args, budget=budget, speed_aware=args.speed_aware, rank_multiple=rank_multiple)
    rows: list[dict[str, Any]] = []
    for family, budget in sources:
        for dtype in dtypes:
            if family == "dense":
                model, _ = load_smollm2(args.device)
            else:
                model, _ = compressed_smollm2(args, budget=budget, speed_aware=args.speed_aware, rank_multiple=rank_multiple)
            model = in_dtype(model, dtype, args.group_size)
            row: dict[str, Any] = {"family": family, "budget": budget, "dtype": dtype, "bytes": weight_bytes(model)}
            print(f"{family} {budget} {dtype}: {row['bytes'] / 2**20:.1f} MiB; perplexity and speed ...", file=sys.stderr)
            row.update(perplexities(model, tokenizer, args.eval_seqs))
            timed = generation_speed({"dense": reference, "point": model}, batches=(1,), new_tokens=args.new_tokens,
                                     prompt_tokens=args.prompt_tokens, prefill=None, rounds=args.rounds, num_threads=args.threads,
                                     device=args.device)
            row["tok_s_b1"] = timed["point"].decode[1]
            row["decode b1 x"] = timed["point"].decode[1] / timed["dense"].decode[1]
            rows.append(row)
            del model
            gc.collect()
    dense_bytes = next(r["bytes"] for r in rows if r["family"] == "dense" and r["dtype"] == "float32") if "float32" in dtypes else None
    for row in rows:
        row["bytes_x"] = row["bytes"] / dense_bytes if dense_bytes else None
        row["MiB"] = row["bytes"] / 2**20
    for key in ("ppl_in", "ppl_other"):
        on_front(rows, key)
    rows.sort(key=lambda r: r["bytes"])
    columns = [("family", "model", ""), ("budget", "budget", ""), ("dtype", "dtype", ""), ("MiB", "weight MiB", ".1f"),
               ("bytes_x", "x dense f32", ".3f"), ("ppl_in", "ppl in-domain", ".2f"), ("front_ppl_in", "front", ""),
               ("ppl_other", "ppl other", ".2f"), ("front_ppl_other", "front", ""), ("tok_s_b1", "tok/s b1", ".1f"),
               ("decode b1 x", "x dense f32", ".2f")]
    print(format_table(rows, columns))
    if "int4" in dtypes:
        print(f"\nint4 in groups of {args.group_size}: the bundled SmolLM2 is a Q4_1 GGUF file (4-bit, blocks of 32), so the dense "
              "model's weights already lie on a 4-bit grid" + (" and int4 in groups of 32 re-quantizes them almost losslessly; "
              "svdkit's factors pay the full int4 error" if args.group_size == 32 else ""), file=sys.stderr)
    note = figure(rows, args.figure) if args.figure else "no figure asked for (--figure FILE.png)"
    print(note, file=sys.stderr)
    if args.json:
        write_json(args.json, {"machine": machine_info(args.device), "args": {k: v for k, v in vars(args).items()},
                               "rows": rows, "figure": note})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
