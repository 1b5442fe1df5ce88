"""A real mixture of experts to measure on: SmolLM2-135M upcycled, then compressed three ways.

No MoE checkpoint ships offline, so this script builds one from the real SmolLM2 (sparse
upcycling): every decoder block's MLP becomes ``--experts`` experts in transformers' Mixtral
architecture (top-2 routing), each a copy of the MLP with a different random ``--drop`` of its
intermediate neurons re-initialized (drop-upcycling, so the experts start apart), and a router
initialized at random; then ``--steps`` steps of next-token training on the built-in calibration
text (router and experts only) make routing and experts differ. The model is built in memory (or
read back from ``--cache``), never committed; the script prints its cost and perplexity.

It is then compressed at each ``--ratios`` fraction of the expert and attention parameters by:

- ``uniform-whiten``: SVD-LLM's whitening, the same ratio in every expert (per-expert statistics),
- ``default``: svdkit's default (fisher: the LM curvature, global budget), experts per expert,
- ``shared``: the default with ``expert_basis="shared"``,

and perplexity is measured on held-out text of the calibration's domain and of another domain.

    python benchmarks/moe_smollm2.py --json moe.json
    python benchmarks/moe_smollm2.py --experts 4 --steps 40 --ratios 0.8 0.6 --cache /tmp/smol-moe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, machine_info, write_json  # noqa: E402

CONFIGS = {
    "uniform-whiten": ({"method": "whiten"}, True),
    "default": ({}, False),
    "shared": ({"expert_basis": "shared"}, False),
}


def upcycle(dense, experts: int, drop: float, seed: int):
    """A Mixtral-architecture copy of the LLaMA ``dense`` whose MLPs are ``experts`` experts each."""
    import torch
    import transformers

    c = dense.config
    config = transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None), hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, rope_theta=getattr(c, "rope_theta", 10000.0),
        tie_word_embeddings=c.tie_word_embeddings, num_local_experts=experts, num_experts_per_tok=2,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None),
        router_jitter_noise=0.0, output_router_logits=False,
    )
    config.architectures = ["MixtralForCausalLM"]
    with torch.device("meta"):
        moe = transformers.MixtralForCausalLM(config)
    moe.to_empty(device="cpu")
    state = dense.state_dict()
    own = moe.state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in state.items():
            if ".mlp." not in key and key in own:
                own[key].copy_(value)
        moe.model.rotary_emb = dense.model.rotary_emb
        for i, block in enumerate(dense.model.layers):
            mlp, target = block.mlp, moe.model.layers[i].mlp
            gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            inter = gate.shape[0]
            for e in range(experts):
                g_e, u_e, d_e = gate.clone(), up.clone(), down.clone()
                if e:  # expert 0 is the MLP itself; the others re-draw a share of their neurons
                    redraw = torch.randperm(inter, generator=g)[: int(drop * inter)]
                    g_e[redraw] = torch.randn(len(redraw), gate.shape[1], generator=g) * gate.std()
                    u_e[redraw] = torch.randn(len(redraw), up.shape[1], generator=g) * up.std()
                    d_e[:, redraw] = torch.randn(down.shape[0], len(redraw), generator=g) * down.std()
                target.experts.gate_up_proj[e].copy_(torch.cat([g_e, u_e]))
                target.experts.down_proj[e].copy_(d_e)
            target.gate.weight.copy_(torch.randn(experts, gate.shape[1], generator=g) * 0.02)
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe.eval()


def train(model, windows, steps: int, lr: float, progress: bool) -> list[float]:
    """Next-token training of the routers and experts (everything else frozen)."""
    import torch

    trained = [p for n, p in model.named_parameters() if ".mlp." in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        batch = windows[step % len(windows)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress:
            print(f"  step {step + 1}/{steps}: loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def build(args: argparse.Namespace):
    """The upcycled model (trained), its tokenizer, and how it was made."""
    import torch
    import transformers

    from svdkit.models import load_model
    from svdkit.tokens import calibration_tokens

    loaded = load_model("smollm2")
    tokenizer = loaded.tokenizer
    cache = Path(args.cache) if args.cache else None
    if cache is not None and (cache / "config.json").exists():
        model = transformers.MixtralForCausalLM.from_pretrained(str(cache), dtype=torch.float32).eval()
        info = json.loads((cache / "upcycling.json").read_text())
        return model, tokenizer, info
    start = time.perf_counter()
    model = upcycle(loaded.module, args.experts, args.drop, args.seed)
    windows = list(calibration_tokens("builtin", tokenizer, n_seqs=args.train_seqs, seq_len=args.seq_len, seed=args.seed + 1).split(args.train_batch))
    from svdkit.eval import language_model_quality

    before = language_model_quality(model, tokenizer, max_tokens=args.eval_tokens)
    losses = train(model, windows, args.steps, args.lr, args.progress)
    after = language_model_quality(model, tokenizer, max_tokens=args.eval_tokens)
    dense = language_model_quality(loaded.module, tokenizer, max_tokens=args.eval_tokens)
    info = {"experts": args.experts, "drop": args.drop, "steps": args.steps, "train_tokens": args.steps * args.train_batch * args.seq_len,
            "seconds": time.perf_counter() - start, "loss_first_last": [losses[0], losses[-1]] if losses else [],
            "ppl_smollm2_dense": dense, "ppl_upcycled_untrained": before, "ppl_upcycled": after,
            "params": sum(p.numel() for p in model.parameters())}
    if cache is not None:
        model.save_pretrained(str(cache))
        (cache / "upcycling.json").write_text(json.dumps(info, indent=2))
    return model, tokenizer, info


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from svdkit import CompressConfig, compress
    from svdkit.eval import language_model_quality
    from svdkit.linalg import ParamRatio
    from svdkit.tokens import calibration_tokens

    torch.set_num_threads(args.threads)
    model, tokenizer, info = build(args)
    print(f"upcycled SmolLM2-MoE: {info['params']:,} parameters, {info['experts']} experts, {info['steps']} steps "
          f"({info['train_tokens']:,} tokens) in {info['seconds']:.0f} s; perplexity {info['ppl_upcycled']}", file=sys.stderr)
    dense = language_model_quality(model, tokenizer, data=args.domains, max_tokens=args.eval_tokens)
    calibration = list(calibration_tokens("builtin", tokenizer, n_seqs=args.calib_seqs, seq_len=args.seq_len, seed=0).split(4))
    rows: list[dict[str, Any]] = []
    result = {"machine": machine_info(), "upcycling": info, "dense_moe": dense, "rows": rows}
    for ratio in args.ratios:
        for name in args.configs:
            fields, uniform = CONFIGS[name]
            gradient_batches = max(1, -(-args.gradient_seqs // 4))
            if uniform:
                config = CompressConfig(**fields, rank=ParamRatio(ratio), gradient_batches=gradient_batches)
            else:
                config = CompressConfig(**fields, budget=ratio, gradient_batches=gradient_batches)
            start = time.perf_counter()
            out, report = compress(model, config, calibration, progress=args.progress)
            seconds = time.perf_counter() - start
            quality = language_model_quality(out, tokenizer, data=args.domains, max_tokens=args.eval_tokens)
            totals = report.totals()
            rows.append({
                "config": name, "ratio": ratio, "kept": report.kept_fraction,
                "expert_kept": totals["expert_params_after"] / totals["expert_params_before"],
                **{f"ppl {k}": v for k, v in quality.items() if isinstance(v, float)},
                **{f"x {k}": v / dense[k] for k, v in quality.items() if isinstance(v, float) and k in dense},
                "shared": sum("+shared-" in row.method for row in report.layers) // max(1, info["experts"]),
                "seconds": seconds,
            })
            print(format_table([rows[-1]], _columns(rows[-1])), file=sys.stderr, flush=True)
            write_json(args.json, result)  # after every row: a long run keeps what it measured
            del out
    return result


def _columns(row: dict[str, Any]) -> list[tuple[str, str, str]]:
    specs = {"config": "", "ratio": ".2f", "kept": ".3f", "expert_kept": ".3f", "shared": "d", "seconds": ".0f"}
    return [(key, key, specs.get(key, ".3f")) for key in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--drop", type=float, default=0.25, help="share of each extra expert's neurons re-drawn")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train-seqs", type=int, default=240)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-seqs", type=int, default=64)
    parser.add_argument("--gradient-seqs", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=8 * 512)
    parser.add_argument("--domains", nargs="+", default=["in-domain", "other-domain", "legal-english", "math-docs"],
                        help="held-out domains the compressed models are measured on")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="directory to keep the upcycled model in (built once)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args)
    if result["rows"]:
        print(format_table(result["rows"], _columns(result["rows"][0])))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
