"""Is a compressed SmolLM2 faster than the dense one? Decode and prefill speed, with and without
speed-aware ranks, next to perplexity.

For each budget (``--budgets``, the fraction of the decoder blocks' parameters kept) SmolLM2 is
compressed twice with ``svdkit compress``'s default config: ``speed_aware="off"`` (ranks by
quality alone, on the device's rank multiple) and ``"on"`` (each layer's rank capped where it stops
running faster than dense, from the cost model measured on this device at ``--threads``; layers
no rank speeds up stay dense). Every model, the dense one included, is then timed in the same
process, interleaved (each round runs every model once on each workload; the best of
``--rounds`` counts):

- decode: greedy generation of ``--new-tokens`` after a ``--prompt-tokens`` prompt at each batch
  of ``--batches`` (tokens/s = batch x new tokens / wall time, the prompt's prefill included);
- prefill: ``--prefill`` (batch x length) tokens through the model with one token generated.

Perplexity (in-domain and other domain) says what the speed costs; the speed-aware model's
ratio to the speed-off model at the same budget is the "within 3 %" target of the issue. The
targets are printed against the numbers. Compressed models are cached in ``--cache``; the cost
model's measurements in svdkit's cache (``$SVDKIT_CACHE_DIR``, else ``~/.cache/svdkit``): measure
on a quiet machine, or remove it first.

    python benchmarks/speed_llm.py --threads 2 --json speed.json
    python benchmarks/speed_llm.py --device cuda --json speed-cuda.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, machine_info, parse_ints, write_json  # noqa: E402
from _llm import add_model_options, compressed_smollm2, load_smollm2, perplexities  # noqa: E402

# budget -> {measure: smallest ratio to dense}; the targets for speed-aware ranks
TARGETS = {0.8: {"decode b1 x": 1.12, "decode b8 x": 1.05, "decode b32 x": 1.05, "prefill x": 1.05},
           0.6: {"decode b1 x": 1.4, "decode b8 x": 1.4, "prefill x": 1.3}}
PPL_TOLERANCE = 1.03


def _prefill(text: str) -> tuple[int, int]:
    batch, length = text.lower().split("x")
    return int(batch), int(length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--batches", type=parse_ints, default=[1, 8, 32], help="decode batch sizes, e.g. 1,8,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=_prefill, default=(8, 512), help="batch x length, e.g. 8x512")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    parser.add_argument("--json", help="write the rows and the machine description here")
    add_model_options(parser)
    args = parser.parse_args(argv)

    import torch

    from svdkit.speed import generation_speed, speed_ratios

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    dense, tokenizer = load_smollm2(args.device)
    models: dict[str, Any] = {"dense": dense}
    rows: dict[str, dict[str, Any]] = {"dense": {"model": "dense", "budget": 1.0, "speed_aware": ""}}
    for budget in args.budgets:
        for speed_aware in ("off", "on"):
            name = f"svdkit {budget} speed-{speed_aware}"
            model, seconds = compressed_smollm2(args, budget=budget, speed_aware=speed_aware)
            models[name] = model
            rows[name] = {"model": name, "budget": budget, "speed_aware": speed_aware, "compress_s": seconds}
    for name, model in models.items():
        params = sum(p.numel() for p in model.model.layers.parameters())
        rows[name]["block_params"] = params
        rows[name]["block_kept"] = params / rows["dense"]["block_params"] if name != "dense" else 1.0
        factorized = [m for m in model.modules() if type(m).__name__ == "LowRankLinear"]
        rows[name]["factorized"] = len(factorized)
        if not args.no_ppl:
            print(f"perplexity of {name} ...", file=sys.stderr)
            rows[name].update(perplexities(model, tokenizer, args.eval_seqs))
    print(f"timing {len(models)} models interleaved, {args.rounds} rounds ...", file=sys.stderr)
    timed = generation_speed(models, batches=args.batches, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                             prefill=args.prefill, rounds=args.rounds, num_threads=args.threads, device=args.device)
    for name, speed in timed.items():
        rows[name].update({f"tok_s_b{b}": v for b, v in speed.decode.items()})
        rows[name]["prefill_s"] = speed.prefill
        rows[name].update(speed_ratios(speed, timed["dense"]))
    for budget in args.budgets:
        off, on = rows[f"svdkit {budget} speed-off"], rows[f"svdkit {budget} speed-on"]
        for key in ("ppl_in", "ppl_other"):
            if key in on:
                on[f"{key}_vs_off"] = on[key] / off[key]

    columns = [("model", "model", ""), ("block_kept", "blocks kept", ".3f"), ("factorized", "factorized", "d"),
               ("ppl_in", "ppl in-domain", ".2f"), ("ppl_other", "ppl other", ".2f"),
               ("ppl_in_vs_off", "ppl in / speed-off", ".3f"), ("ppl_other_vs_off", "ppl other / speed-off", ".3f"),
               *[c for b in args.batches for c in ((f"tok_s_b{b}", f"tok/s b{b}", ".1f"), (f"decode b{b} x", "x dense", ".2f"))],
               ("prefill_s", f"prefill {args.prefill[0]}x{args.prefill[1]} s", ".3f"), ("prefill x", "x dense", ".2f")]
    print(format_table(list(rows.values()), columns))
    checks = []
    for budget, targets in TARGETS.items():
        row = rows.get(f"svdkit {budget} speed-on")
        if row is None:
            continue
        for key, target in targets.items():
            if key in row:
                checks.append({"budget": budget, "measure": key, "target": f">= {target}", "measured": round(row[key], 3),
                               "met": row[key] >= target})
        for key in ("ppl_in_vs_off", "ppl_other_vs_off"):
            if key in row:
                checks.append({"budget": budget, "measure": key, "target": f"<= {PPL_TOLERANCE}", "measured": round(row[key], 4),
                               "met": row[key] <= PPL_TOLERANCE})
    if checks:
        print("\ntargets (speed-aware ranks):")
        print(format_table(checks, [("budget", "budget", ""), ("measure", "measure", ""), ("target", "target", ""),
                                    ("measured", "measured", ""), ("met", "met", "")]))
    if args.json:
        write_json(args.json, {"machine": machine_info(args.device), "args": {k: v for k, v in vars(args).items()},
                               "rows": list(rows.values()), "targets": checks})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
