"""LoRA init benchmark: adaptation quality on digits, and the cost and accuracy of PiSSA init.

Part ``digits``
    An MLP (64-128-128-10) is trained on scikit-learn's digits 0-4, then adapted to digits 5-9
    with LoRA on all three Linear layers, rank 4 and 8, under the gaussian, pissa, milora and eva
    inits, for the same number of Adam steps at one learning rate, over 3 seeds. Writes the loss
    curves (PNG) and reports the final accuracy on the held-out 5-9 digits.

Part ``minilm``
    PiSSA rank 16 on all 37 Linear layers of all-MiniLM-L6-v2: svdkit (exact and randomized SVD)
    and peft (``pissa`` and ``pissa_niter_4``), interleaved in one process. Reports the time, the
    largest output deviation at init, and the energy the adapter's subspace captures relative to
    the exact top-16 energy, ``||Q_B^T W||_F^2 / sum_{i<=16} s_i^2`` per layer.

Part ``llama``
    The same on one LLaMA-7B-shaped decoder block (hidden 4096, MLP 11008) built from a
    transformers config with random weights: svdkit randomized vs peft ``pissa_niter_4``
    (interleaved, medians), plus one run each of svdkit exact and peft ``pissa`` (exact; ~100 s,
    skip with ``--skip-exact-peft``).

Usage::

    python benchmarks/lora_init.py                     # all parts
    python benchmarks/lora_init.py --parts llama --reps 5 --skip-exact-peft --skip-exact-svdkit

Timings are wall-clock on a possibly shared machine: the methods are interleaved in one process
and the medians, minima and paired ratios are printed together with the load average.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from svdkit.lora import add_lora, find_root, lora_layers
from svdkit.views import weight_matrix

INITS = ("gaussian", "pissa", "milora", "eva")


# ---------------------------------------------------------------------------------------- digits
def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _train(model: nn.Module, X, y, steps: int, lr: float, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _accuracy(model: nn.Module, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def run_digits(args, out: Path) -> dict:
    Xtr, Xte, ytr, yte = _digits()
    old_tr, new_tr, old_te, new_te = ytr < 5, ytr >= 5, yte < 5, yte >= 5
    base = _mlp()
    _train(base, Xtr[old_tr], ytr[old_tr], 500, 1e-3, 0)
    base.eval()
    print(f"base MLP: accuracy {_accuracy(base, Xte[old_te], yte[old_te]):.3f} on digits 0-4, "
          f"{_accuracy(base, Xte[new_te], yte[new_te]):.3f} on 5-9")
    results: dict = {"steps": args.steps, "lr": args.lr, "runs": {}}
    for rank in (4, 8):
        for init in INITS:
            curves, accs = [], []
            for seed in range(3):
                model = add_lora(base, None, r=rank, lora_alpha=rank, init_lora_weights=init, seed=seed, calibration=[Xtr[new_tr]])
                curves.append(_train(model, Xtr[new_tr], ytr[new_tr], args.steps, args.lr, seed))
                accs.append(_accuracy(model, Xte[new_te], yte[new_te]))
            results["runs"][f"r{rank}/{init}"] = {"curves": curves, "accuracy": accs}
            print(f"rank {rank:>2} {init:<9} final accuracy {np.mean(accs):.3f} +- {np.std(accs):.3f} "
                  f"(seeds {', '.join(f'{a:.3f}' for a in accs)}), last-10-step loss {np.mean([c[-10:] for c in curves]):.3f}")
    _plot(results, out / "lora_init_digits.png")
    return results


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, rank in zip(axes, (4, 8)):
        for init in INITS:
            curves = np.array(results["runs"][f"r{rank}/{init}"]["curves"])
            kernel = np.ones(10) / 10
            smooth = np.array([np.convolve(c, kernel, mode="valid") for c in curves])
            steps = np.arange(smooth.shape[1]) + 10
            ax.plot(steps, smooth.mean(0), label=init)
            ax.fill_between(steps, smooth.min(0), smooth.max(0), alpha=0.2)
        ax.set_title(f"LoRA rank {rank}: digits 0-4 -> 5-9 (3 seeds)")
        ax.set_xlabel("Adam step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (10-step mean)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------- PiSSA timing
def _captured(W: torch.Tensor, B: torch.Tensor, rank: int, exact_energy: torch.Tensor) -> float:
    """``||Q^T W||_F^2 / exact_energy`` with ``Q`` an orthonormal basis of the adapter's columns ``B``."""
    Q, _ = torch.linalg.qr(B.detach().double())
    return float(Q.T.matmul(W.detach().double()).square().sum() / exact_energy)


def _exact_energies(weights: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {n: torch.linalg.svdvals(W.double())[:rank].square().sum() for n, W in weights.items()}


def _svdkit_pissa(model: nn.Module, rank: int, svd_method: str) -> tuple[nn.Module, float, dict[str, torch.Tensor]]:
    target = copy.deepcopy(model)
    gc.collect()
    t = time.perf_counter()
    add_lora(target, None, r=rank, lora_alpha=rank, init_lora_weights="pissa", svd_method=svd_method, inplace=True)
    elapsed = time.perf_counter() - t
    return target, elapsed, {n: layer.factors()[0] for n, layer in lora_layers(target)}  # B, the left factor


def _peft_pissa(model: nn.Module, rank: int, init: str, targets: list[str]) -> tuple[nn.Module, float, dict[str, torch.Tensor]]:
    import peft

    target = copy.deepcopy(model)
    gc.collect()
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=init)
    t = time.perf_counter()
    peft_model = peft.get_peft_model(target, config)
    elapsed = time.perf_counter() - t
    prefix = "base_model.model."
    factors = {
        n[len(prefix):]: m.lora_B["default"].weight
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {})
    }
    return peft_model, elapsed, factors


def _deviation(y: torch.Tensor, y0: torch.Tensor) -> dict[str, float]:
    diff = (y - y0).double()
    return {
        "max_abs": float(diff.abs().max()),
        "max_rel": float(diff.abs().max() / y0.double().abs().max()),
        "fro_rel": float(diff.norm() / y0.double().norm()),
    }


def _time_pissa(name: str, model: nn.Module, run_forward, peft_targets: list[str], args, methods: list[str],
                repeated: list[str], rank: int = 16, energy: bool = True) -> dict:
    """Interleave the methods ``args.reps`` times (those in ``repeated``; the others run once)."""
    root_name, root = find_root(model)
    weights = {n: weight_matrix(m).detach().clone() for n, m in root.named_modules()
               if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in peft_targets)}
    exact_energy = _exact_energies(weights, rank) if energy else None
    with torch.no_grad():
        y0 = run_forward(root)
    stats: dict = {m: {"times": []} for m in methods}
    for rep in range(args.reps):
        for method in methods:
            if rep > 0 and method not in repeated:
                continue
            if method.startswith("svdkit"):
                adapted, elapsed, factors = _svdkit_pissa(model, rank, method.split("-")[1])
                adapted_root = find_root(adapted, root_name)[1]
                factors = {n[len(root_name) + 1:] if root_name else n: B for n, B in factors.items()}
            else:
                init = "pissa" if method == "peft-pissa" else "pissa_niter_4"
                adapted_root, elapsed, factors = _peft_pissa(root, rank, init, peft_targets)
            stats[method]["times"].append(elapsed)
            if rep == 0:
                with torch.no_grad():
                    stats[method]["deviation"] = _deviation(run_forward(adapted_root), y0)
                stats[method]["layers"] = len(factors)
                if exact_energy is not None:
                    kept = {n: _captured(weights[n], B, rank, torch.ones(())) for n, B in factors.items()}
                    ratios = [kept[n] / float(exact_energy[n]) for n in kept]
                    stats[method]["energy_min"] = min(ratios)
                    stats[method]["energy_mean"] = float(np.mean(ratios))
                    stats[method]["energy_total"] = sum(kept.values()) / float(sum(exact_energy[n] for n in kept))
            del adapted_root, factors
            gc.collect()
            print(f"  [{name}] rep {rep} {method:<18} {elapsed:8.2f} s", flush=True)
    for method in methods:
        times = stats[method]["times"]
        stats[method]["median_s"] = statistics.median(times)
        stats[method]["min_s"] = min(times)
    print(f"\n{name}: PiSSA rank {rank} over {stats[methods[0]]['layers']} Linear layers "
          f"({args.reps} interleaved reps for {', '.join(repeated)}; load average {os.getloadavg()[0]:.1f})")
    print(f"{'method':<18} {'median s':>9} {'min s':>7} {'runs':>5} {'max|dy|/max|y|':>15} {'energy min':>11} {'mean':>8} {'total':>8}")
    for method in methods:
        s = stats[method]
        energy_cols = (f"{100 * s['energy_min']:10.2f}% {100 * s['energy_mean']:7.2f}% {100 * s['energy_total']:7.2f}%"
                       if "energy_min" in s else f"{'-':>11} {'-':>8} {'-':>8}")
        print(f"{method:<18} {s['median_s']:9.2f} {s['min_s']:7.2f} {len(s['times']):5d} {s['deviation']['max_rel']:15.2e} {energy_cols}")
    return stats


def run_minilm(args) -> dict:
    from svdkit.data import builtin_sentences
    from svdkit.models import load_model

    loaded = load_model("minilm")
    loaded.module.eval()
    features = loaded.tokenize(builtin_sentences("topics", split="odd")[:32])
    inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    run = lambda bert: bert(**inputs).last_hidden_state  # noqa: E731
    methods = ["svdkit-randomized", "peft-pissa_niter_4", "svdkit-exact", "peft-pissa"]
    return _time_pissa("all-MiniLM-L6-v2", loaded.module, run, ["query", "key", "value", "dense"], args, methods, methods)


def _llama_block() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=256, max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaModel(config).eval()


def run_llama(args) -> dict:
    model = _llama_block()
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    run = lambda m: m(input_ids=ids).last_hidden_state  # noqa: E731
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    methods = (["svdkit-randomized", "peft-pissa_niter_4"] + ([] if args.skip_exact_svdkit else ["svdkit-exact"])
               + ([] if args.skip_exact_peft else ["peft-pissa"]))
    stats = _time_pissa("LLaMA-7B-shaped block", model, run, targets, args, methods, ["svdkit-randomized", "peft-pissa_niter_4"],
                        energy=args.llama_energy)
    ratio = stats["svdkit-randomized"]["median_s"] / stats["peft-pissa_niter_4"]["median_s"]
    paired = [a / b for a, b in zip(stats["svdkit-randomized"]["times"], stats["peft-pissa_niter_4"]["times"])]
    stats["ratio_randomized_vs_niter4"] = {"of_medians": ratio, "paired_median": statistics.median(paired)}
    ratio_min = stats["svdkit-randomized"]["min_s"] / stats["peft-pissa_niter_4"]["min_s"]
    stats["ratio_randomized_vs_niter4"]["of_minima"] = ratio_min
    print(f"svdkit randomized / peft pissa_niter_4: {ratio:.2f} (ratio of medians), {statistics.median(paired):.2f} "
          f"(median of paired ratios), {ratio_min:.2f} (ratio of minima)")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="digits,minilm,llama", help="comma-separated: digits, minilm, llama")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps of each LoRA run on digits")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate of every LoRA run on digits")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the timed inits")
    parser.add_argument("--skip-exact-peft", action="store_true", help="skip peft's exact-SVD pissa on the LLaMA block (~100 s)")
    parser.add_argument("--skip-exact-svdkit", action="store_true", help="skip svdkit's exact-SVD pissa on the LLaMA block")
    parser.add_argument("--llama-energy", action="store_true", help="also measure captured energy on the LLaMA block (exact SVDs)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default="bench-results/lora_init", help="directory for the PNG and results.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    results = {}
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    runners = {"digits": lambda: run_digits(args, out), "minilm": lambda: run_minilm(args), "llama": lambda: run_llama(args)}
    for part in parts:
        if part not in runners:
            parser.error(f"unknown part {part!r}; choose from {sorted(runners)}")
        print(f"\n=== {part} ===")
        results[part] = runners[part]()
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
