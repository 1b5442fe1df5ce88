"""Decode speed of a compressed T5, whose feed-forward reads ``wo.weight.dtype`` in every call.

A factorized layer answers ``weight`` lazily (shape, dtype and device without the product; see
``svdkit.layers.lowrank.lazy_weight``). This runs a T5 of t5-small's geometry (random weights:
speed only) with every feed-forward ``wo`` factorized at ``--rank``, greedy decoding at batch 1,
against the dense model and against the same factorized model whose ``weight`` multiplies the
factors on every read; the three timed in turn, best of ``--repeats``.

    python benchmarks/weight_reads.py --rank 128 --tokens 32 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import best_of_interleaved, format_table, machine_info, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows and the machine description here")
    args = parser.parse_args(argv)

    from transformers import T5Config, T5ForConditionalGeneration

    from svdkit import CompressConfig, compress
    from svdkit.layers.lowrank import LowRankLinear

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = T5Config(d_model=512, d_ff=2048, num_layers=6, num_heads=8, d_kv=64, vocab_size=32128,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    dense = T5ForConditionalGeneration(config).eval()
    small, _ = compress(dense, CompressConfig(method="svd", rank=args.rank, target_modules=r".*DenseReluDense\.wo"))
    ids = torch.randint(2, 32000, (1, 32), generator=torch.Generator().manual_seed(0))
    lazy = LowRankLinear.weight
    eager = property(lambda self: self.dense_weight())

    def decode(model, weight=lazy):
        LowRankLinear.weight = weight
        try:
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, eos_token_id=None)
        finally:
            LowRankLinear.weight = lazy

    timed = best_of_interleaved({
        "dense": lambda: decode(dense),
        "factorized wo, lazy weight (svdkit)": lambda: decode(small),
        "factorized wo, weight multiplied per read": lambda: decode(small, eager),
    }, args.repeats)
    outputs = [tokens for _, tokens in timed.values()]
    assert torch.equal(outputs[1], outputs[2]), "the two weights must give the same tokens"
    base = args.tokens / timed["dense"][0]
    rows = [{"run": name, "tokens_per_s": args.tokens / seconds, "x_dense": args.tokens / seconds / base}
            for name, (seconds, _) in timed.items()]
    print(format_table(rows, [("run", "run", ""), ("tokens_per_s", "tokens/s", ".1f"), ("x_dense", "x dense", ".2f")]))
    write_json(args.json, {"machine": machine_info(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
