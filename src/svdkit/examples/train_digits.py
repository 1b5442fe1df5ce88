"""Train a small CNN on scikit-learn's digits and watch its spectra and trajectory.

Run ``python -m svdkit.examples.train_digits --track OUT`` to write, in folder ``OUT``:

- ``spectral.csv``: per-layer metrics against step (:class:`svdkit.analysis.training.SpectralTracker`),
- ``spectral.png``: each metric against step, one line per layer,
- ``trajectory.png`` and ``trajectory.json``: the SVD of the step-to-step updates and the
  gradient overlap with the top-k update subspace (:class:`svdkit.analysis.training.TrajectoryRecorder`).

The data are the 1,797 8x8 images that ship with scikit-learn; training takes a few seconds on
a CPU. The model and data loader are importable for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

__all__ = ["DigitsCNN", "evaluate", "load_digits_split", "main", "train"]


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as tensors, split at random into train and test.

    Returns
    -------
    X_train : Tensor of shape (n_train, 1, 8, 8), float32 in [0, 1]
    y_train : Tensor of shape (n_train,), int64 labels 0..9
    X_test : Tensor of shape (n_test, 1, 8, 8)
    y_test : Tensor of shape (n_test,)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits example needs scikit-learn: pip install scikit-learn") from exc
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return X[train], y[train], X[test], y[test]


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a max-pool and two Linear layers: 8x8 image -> 10 logits.

    Layers: ``conv1`` (16, 1, 3, 3), ``conv2`` (32, 16, 3, 3), ``fc1`` (64, 512), ``fc2`` (10, 64).
    """

    def __init__(self, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, 10) for images of shape (batch, 1, 8, 8)."""
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` on images ``X`` (n, 1, 8, 8) with labels ``y`` (n,)."""
    model.eval()
    accuracy = (model(X).argmax(dim=1) == y).float().mean().item()
    model.train()
    return accuracy


def train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[float]:
    """Train with Adam and cross-entropy on shuffled mini-batches; returns the loss of each step."""
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(X[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m svdkit.examples.train_digits", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--track", metavar="OUT", type=Path, help="folder for spectral.csv and the figures")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--mode", choices=("fast", "full"), default="fast", help="tracker mode (default: fast)")
    parser.add_argument("--every", type=int, default=1, help="track every N steps (default: 1)")
    parser.add_argument(
        "--full-every", type=int, default=25, help="fast mode: full spectrum every N steps, 0 for never (default: 25)"
    )
    parser.add_argument("--snapshot-every", type=int, default=5, help="trajectory snapshot every N steps (default: 5)")
    parser.add_argument("--top-k", type=int, default=10, help="update subspace size for the gradient overlap")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train, and with ``--track OUT`` write the CSV, the figures and the trajectory summary."""
    args = _parser().parse_args(argv)
    torch.manual_seed(args.seed)
    X_train, y_train, X_test, y_test = load_digits_split(seed=args.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    tracker = recorder = None
    if args.track is not None:
        from ..analysis.training import CSVSink, SpectralTracker, TrajectoryRecorder

        args.track.mkdir(parents=True, exist_ok=True)
        full_every = args.full_every if args.mode == "fast" and args.full_every > 0 else None
        tracker = SpectralTracker(
            model, every=args.every, mode=args.mode, full_every=full_every, sinks=[CSVSink(args.track / "spectral.csv")]
        ).attach(optimizer)
        recorder = TrajectoryRecorder(model, every=args.snapshot_every, max_snapshots=128, top_k=args.top_k).attach(optimizer)
    start = time.perf_counter()
    losses = train(model, X_train, y_train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, optimizer=optimizer)
    seconds = time.perf_counter() - start
    print(f"trained {len(losses)} steps in {seconds:.1f} s; final loss {losses[-1]:.3f}; "
          f"test accuracy {evaluate(model, X_test, y_test):.3f}")
    if tracker is None:
        return 0
    from ..report.training_plots import plot_spectral_history, plot_trajectory

    tracker.close()
    recorder.detach()
    history = tracker.history
    plot_spectral_history(history, args.track / "spectral.png", title="DigitsCNN on scikit-learn digits")
    analysis = recorder.analyze()
    plot_trajectory(analysis, args.track / "trajectory.png", title="DigitsCNN trajectory")
    (args.track / "trajectory.json").write_text(json.dumps(analysis.to_dict(), indent=1))
    print(f"{'layer':<8}" + "".join(f"{m:>18}" for m in history.metrics))
    for layer, values in history.last().items():
        print(f"{layer:<8}" + "".join(f"{values.get(m, float('nan')):>18.4g}" for m in history.metrics))
    late = analysis.overlaps[len(analysis.overlaps) // 2 :]
    print(
        f"trajectory: {len(analysis.steps)} snapshots, {analysis.effective_directions:.1f} effective directions, "
        f"{analysis.dims_90} / {analysis.dims_99} directions explain 90 / 99 % of the movement; "
        f"gradient overlap with the top-{analysis.top_k} update subspace (second half of training): "
        f"median {float(torch.tensor(late).median()) if len(late) else float('nan'):.2f}"
    )
    print(f"wrote {args.track / 'spectral.csv'}, spectral.png, trajectory.png, trajectory.json")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
