"""Step-time overhead of SpectralTracker on real training loops, and the fast sigma_max error.

Two workloads, each trained with Adam:

- ``digits``: the DigitsCNN of ``svdkit.examples.train_digits`` on scikit-learn's digits, batch 64;
- ``transformer``: 4 pre-LayerNorm transformer blocks at width 256 (4 heads, MLP 1024), a
  byte-level language model on CPython's ``pydoc_data`` text, batch 16 x 64 tokens; the tracker
  follows the 24 Linear layers of the blocks.

Configurations, each with its own copy of the model (same initial weights): no tracking;
``fast`` every step; ``full`` every 50 steps. Rounds interleave the configurations (in rotating
order) and time blocks of ``--block`` steps (50, so every block holds exactly one full-mode
event); the overhead of a configuration is the median over rounds of its block time divided by
the baseline's block time in the same round. After each block the fast tracker's latest
``sigma_max`` is compared with the exact one (``torch.linalg.svdvals``, outside the timing).

Usage::

    python benchmarks/tracker_overhead.py [--rounds 9] [--transformer-rounds 4] [--json out.json]

Targets: fast every step <= 10 % overhead; full every 50 steps <= 5 %; fast sigma_max within
1 % of exact after the first few steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from svdkit.analysis.training import SpectralTracker
from svdkit.examples.train_digits import DigitsCNN, load_digits_split
from svdkit.views import weight_matrix

TARGETS = {"fast": 0.10, "full": 0.05}


class Block(nn.Module):
    """Pre-LayerNorm transformer block with separate q, k, v, o projections."""

    def __init__(self, width: int = 256, heads: int = 4, hidden: int = 1024) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(B, T, self.heads, D // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteLM(nn.Module):
    """Byte-level language model: embedding, ``depth`` blocks, LayerNorm, head."""

    def __init__(self, depth: int = 4, width: int = 256, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def digits_workload(seed: int):
    X, y, _, _ = load_digits_split(seed=seed)
    generator = torch.Generator().manual_seed(seed)

    def batch():
        idx = torch.randint(0, len(y), (64,), generator=generator)
        return X[idx], y[idx]

    def loss_fn(model, data):
        return F.cross_entropy(model(data[0]), data[1])

    torch.manual_seed(seed)
    return DigitsCNN(), batch, loss_fn, None


def transformer_workload(seed: int):
    from pydoc_data.topics import topics

    text = torch.tensor(list(" ".join(topics.values()).encode("utf-8")), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)

    def batch():
        start = torch.randint(0, len(text) - 65, (16,), generator=generator)
        chunk = text[start[:, None] + torch.arange(65)]
        return chunk[:, :-1], chunk[:, 1:]

    def loss_fn(model, data):
        logits = model(data[0])
        return F.cross_entropy(logits.reshape(-1, 256), data[1].reshape(-1))

    torch.manual_seed(seed)
    return ByteLM(), batch, loss_fn, r"blocks\.\d+\.(q|k|v|o|fc1|fc2)"


WORKLOADS = {"digits": digits_workload, "transformer": transformer_workload}


def run_workload(
    name: str, rounds: int, block: int, seed: int, warmup: int, device: str = "cpu", fast_options: dict | None = None
) -> dict:
    base_model, make_batch, loss_fn, targets = WORKLOADS[name](seed)

    def batch():
        return tuple(t.to(device) for t in make_batch())

    configs = {}
    for config in ("none", "fast", "full"):
        model = copy.deepcopy(base_model).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        tracker = None
        if config == "fast":
            tracker = SpectralTracker(model, every=1, target_modules=targets, mode="fast", **(fast_options or {})).attach(optimizer)
        elif config == "full":
            tracker = SpectralTracker(model, every=block, target_modules=targets, mode="full").attach(optimizer)
        configs[config] = {"model": model, "optimizer": optimizer, "tracker": tracker, "times": [], "cpu": []}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def train_steps(cfg: dict, n: int) -> tuple[float, float]:
        """Wall-clock and process CPU seconds of ``n`` training steps."""
        model, optimizer = cfg["model"], cfg["optimizer"]
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            data = batch()
            loss = loss_fn(model, data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    fast = configs["fast"]
    modules = [fast["model"].get_submodule(layer) for layer in fast["tracker"].layer_names]

    def sigma_error() -> tuple[int, float]:
        history = fast["tracker"].history
        estimate = torch.tensor(history.values("sigma_max")[-1])
        with torch.no_grad():
            exact = torch.stack([torch.linalg.svdvals(weight_matrix(m).double().cpu())[0] for m in modules])
        return int(history.steps[-1]), float(((exact - estimate) / exact).abs().max())

    # The first steps: sigma_max error right after the warm start.
    early = []
    for _ in range(5):
        train_steps(fast, 1)
        early.append(sigma_error())
    for cfg in configs.values():  # warm caches and allocators; align step counters
        train_steps(cfg, warmup + (0 if cfg is fast else 5))
    errors = []
    order = list(configs)
    for r in range(rounds):
        for config in order[r % 3 :] + order[: r % 3]:
            wall, cpu = train_steps(configs[config], block)
            configs[config]["times"].append(wall / block)
            configs[config]["cpu"].append(cpu / block)
        errors.append(sigma_error())
    base = configs["none"]["times"]
    base_cpu = configs["none"]["cpu"]
    result = {
        "workload": name, "device": device, "block_steps": block, "rounds": rounds, "tracked_layers": len(modules),
        "fast_options": {"block_size": fast["tracker"].block_size, "power_iters": fast["tracker"].power_iters},
    }
    result["step_ms"] = {c: 1e3 * statistics.median(v["times"]) for c, v in configs.items()}
    for config in ("fast", "full"):
        ratios = [t / b for t, b in zip(configs[config]["times"], base)]
        result[f"{config}_overhead"] = statistics.median(ratios) - 1
        result[f"{config}_overhead_range"] = [min(ratios) - 1, max(ratios) - 1]
        cpu_ratios = [t / b for t, b in zip(configs[config]["cpu"], base_cpu)]
        result[f"{config}_cpu_overhead"] = statistics.median(cpu_ratios) - 1
    result["sigma_error_first_steps"] = early
    result["sigma_error_max_after_warmup"] = max(e for _, e in errors)
    result["sigma_error_by_step"] = errors
    for cfg in configs.values():
        if cfg["tracker"] is not None:
            cfg["tracker"].close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds for the digits CNN")
    parser.add_argument("--transformer-rounds", type=int, default=4, help="interleaved rounds for the transformer")
    parser.add_argument("--block", type=int, default=50, help="steps per timed block (= the full-mode cadence)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before the rounds")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device of the models (the targets are for the CPU)")
    parser.add_argument("--block-size", type=int, default=None, help="fast mode's block size (default: the tracker's)")
    parser.add_argument("--power-iters", type=int, default=None, help="fast mode's Krylov depth (default: the tracker's)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.workloads:
        rounds = args.transformer_rounds if name == "transformer" else args.rounds
        options = {k: v for k, v in (("block_size", args.block_size), ("power_iters", args.power_iters)) if v is not None}
        results.append(run_workload(name, rounds, args.block, args.seed, args.warmup, args.device, options))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    options = results[0]["fast_options"]
    print(
        f"torch {torch.__version__}, device {args.device} ({where}), {torch.get_num_threads()} CPU threads; "
        f"fast mode: block_size={options['block_size']}, power_iters={options['power_iters']}"
    )
    header = (
        f"{'workload':<12}{'layers':>7}{'base ms/step':>14}{'fast@1':>10}{'full@50':>10}"
        f"{'fast@1 cpu':>12}{'full@50 cpu':>13}{'sigma err (steps 1-5)':>24}{'sigma err after':>17}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        first = max(e for _, e in r["sigma_error_first_steps"])
        print(
            f"{r['workload']:<12}{r['tracked_layers']:>7}{r['step_ms']['none']:>14.2f}"
            f"{r['fast_overhead']:>+10.1%}{r['full_overhead']:>+10.1%}{r['fast_cpu_overhead']:>+12.1%}"
            f"{r['full_cpu_overhead']:>+13.1%}{first:>24.2%}{r['sigma_error_max_after_warmup']:>17.3%}"
        )
    print(
        "overhead: median over interleaved rounds of (tracked block time / untracked block time) - 1, in wall-clock\n"
        "and in process CPU time (steadier on a shared machine); sigma err: largest relative error of the fast\n"
        "sigma_max over the tracked layers, at steps 1-5 and at the end of every timed block after them.\n"
        f"targets: fast <= {TARGETS['fast']:.0%}, full@50 <= {TARGETS['full']:.0%}, sigma error <= 1 % after the first steps"
    )
    for r in results:
        verdicts = [
            f"fast {'met' if r['fast_overhead'] <= TARGETS['fast'] else 'MISSED'}",
            f"full {'met' if r['full_overhead'] <= TARGETS['full'] else 'MISSED'}",
            f"sigma {'met' if r['sigma_error_max_after_warmup'] <= 0.01 else 'MISSED'}",
        ]
        print(f"{r['workload']}: " + ", ".join(verdicts) + f"; overhead ranges fast {r['fast_overhead_range']}, full {r['full_overhead_range']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(), "results": results},
                handle, indent=1,
            )


if __name__ == "__main__":
    main()
