"""Where a compressed LLM loses quality on text unlike its calibration: groups of layers given back
their dense weights, and what each held-out domain recovers.

SmolLM2-135M is compressed by svdkit's default at ``--ratio`` (cached like the speed benchmarks,
``--cache``), then for each group of factorized layers (each projection kind, q_proj ... down_proj,
across all blocks, and each third of the stack) the group's dense layers are put back and
perplexity is measured on every held-out domain. A group's **share** of a domain's loss is the
part of the log-perplexity gap to dense that restoring it removes (1: the whole gap; shares of
disjoint groups need not add up to 1, since layers interact); ``params`` is the share of the
removed parameters the group gives back. A group whose share on unlike text is much larger than
on the calibration's own domain is where the calibration misleads the compression.

    python benchmarks/domain_loss_llm.py --ratio 0.6 --eval-seqs 8 --json loss.json
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, machine_info, write_json  # noqa: E402
from _llm import add_model_options, compressed_smollm2, load_smollm2  # noqa: E402

from svdkit.tokens import EVALUATION_DOMAINS  # noqa: E402


def _block(name: str) -> int | None:
    """The index of the decoder block that holds layer ``name`` (None outside the blocks)."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _groups(names: list[str], slices: int) -> dict[str, list[str]]:
    """Factorized layer names by projection kind, then by depth (``slices`` slices of the stack)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    blocks = sorted({b for b in map(_block, names) if b is not None})
    if blocks:
        size = math.ceil(len(blocks) / slices)
        for start in range(0, len(blocks), size):
            part = blocks[start:start + size]
            groups[f"blocks {part[0]}-{part[-1]}"] = [name for name in names if _block(name) in part]
    return groups


def _swap(model, modules: dict[str, Any]) -> dict[str, Any]:
    """Put ``modules`` (name -> module) into ``model``; returns the modules they replaced."""
    from svdkit.surgery import replace_module

    return {name: replace_module(model, name, module) for name, module in modules.items()}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from svdkit.eval import language_model_quality
    from svdkit.layers.lowrank import low_rank_types

    torch.set_num_threads(args.threads)
    dense, tokenizer = load_smollm2(args.device)
    compressed, _ = compressed_smollm2(args, budget=args.ratio)
    names = [name for name, module in compressed.named_modules() if isinstance(module, low_rank_types())]
    removed = {name: _params(dense.get_submodule(name)) - _params(compressed.get_submodule(name)) for name in names}

    def quality(model) -> dict[str, float]:
        scored = language_model_quality(model, tokenizer, data=list(args.domains), max_tokens=args.eval_seqs * 512)
        return {domain: scored[domain] for domain in args.domains}

    reference, worst = quality(dense), quality(compressed)
    print(f"dense {reference}\ncompressed at {args.ratio}: {worst}", file=sys.stderr)
    rows = []
    for group, members in _groups(names, args.depth_slices).items():
        previous = _swap(compressed, {name: dense.get_submodule(name) for name in members})
        try:
            restored = quality(compressed)
        finally:
            _swap(compressed, previous)
        row: dict[str, Any] = {"group": group, "layers": len(members),
                               "params": sum(removed[n] for n in members) / sum(removed.values())}
        for domain in args.domains:
            gap = math.log(worst[domain] / reference[domain])
            row[f"ppl {domain}"] = restored[domain]
            row[f"share {domain}"] = math.log(worst[domain] / restored[domain]) / gap if gap > 0 else float("nan")
        rows.append(row)
        print(format_table([row], _columns(args.domains)), file=sys.stderr, flush=True)
    return {"machine": machine_info(args.device), "args": vars(args), "dense": reference, "compressed": worst, "rows": rows}


def _columns(domains) -> list[tuple[str, str, str]]:
    return [("group", "restored group", ""), ("layers", "layers", "d"), ("params", "params back", ".3f"),
            *[(f"share {d}", f"share {d}", ".3f") for d in domains], *[(f"ppl {d}", f"ppl {d}", ".2f") for d in domains]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--ratio", type=float, default=0.6, help="fraction of the blocks' parameters kept (the default's budget)")
    parser.add_argument("--domains", nargs="+", default=list(EVALUATION_DOMAINS))
    parser.add_argument("--depth-slices", type=int, default=3, help="slices of the stack restored one at a time")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args)
    print(format_table(result["rows"], _columns(args.domains)))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
