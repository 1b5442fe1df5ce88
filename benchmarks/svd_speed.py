"""Randomized SVDs side by side: time and accuracy against the exact optimum and a matrix-product floor.

Compared in one run, on the same matrices:

- ``svdkit``: :func:`svdkit.linalg.randomized_svd` with its defaults (block Krylov, ``n_iter="auto"``:
  steps are added until the top-k Ritz values settle); the ``passes`` column says how many products
  with ``A`` or ``A^T`` it made.
- ``svdkit n_iter=2``: the same with two fixed Krylov steps (6 passes), the default before ``"auto"``
  adapted.
- ``sklearn``: :func:`sklearn.utils.extmath.randomized_svd` with its defaults (``random_state`` set
  for reproducibility).
- ``svd_lowrank``: ``torch.svd_lowrank(A, q=k + 10, niter=2)``, truncated to ``k``.
- ``exact``: ``torch.linalg.svd(A, full_matrices=False)`` truncated to ``k`` (timed once per matrix).
- ``floor``: the bare matrix products of svdkit's plan: ``2 * (q + 1)`` products of ``A`` and ``A^T``
  with blocks of the same width ``l = k + 10``, nothing else, for the steps ``q`` the default call
  made (and for ``q = 2`` when that differs, the floor of the ``n_iter=2`` row).

Matrices: ``decay`` has singular values ``s_i = i**-0.7`` (like trained weights) with Haar-random
singular vectors; ``gaussian`` has i.i.d. standard normal entries. Accuracy is the Frobenius error
``||A - U S V^T||_F`` over the Eckart-Young optimum ``sqrt(sum_{i>k} s_i**2)``, and the largest
relative error of the top-``k`` singular values.

Usage::

    python benchmarks/svd_speed.py                       # the full grid (several minutes)
    python benchmarks/svd_speed.py --quick               # a short smoke run
    python benchmarks/svd_speed.py --shapes 4096x4096 --ranks 64 --spectra decay --json out.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Callable

import torch

from _common import best_of, best_of_interleaved, format_table, machine_info, parse_ints, parse_shapes, sync, write_json

from svdkit.linalg import randomized_svd
from svdkit.linalg.randomized import _plan

DEFAULT_SHAPES = "1024x1024,4096x4096,4096x11008"
DEFAULT_RANKS = "16,64,256"
QUICK_SHAPES = "512x512,1024x2048"
QUICK_RANKS = "16,64"
DECAY_ALPHA = 0.7
OVERSAMPLES = 10  # svdkit's default, and the q = k + 10 given to torch.svd_lowrank
FIXED_N_ITER = 2  # the fixed-steps row (the default before n_iter="auto" adapted)

# Targets from the issue, checked on the decaying spectra.
TARGET_ERROR_RATIO = 1.002
TARGET_SPEEDUP = 3.0
TARGET_SPEEDUP_CASES = {((4096, 4096), 64), ((4096, 11008), 256)}
TARGET_FLOOR_RATIO = 1.5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_matrix(shape: tuple[int, int], spectrum: str, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float32 matrix and, for ``decay``, its exact singular values (float64, on the CPU)."""
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    if spectrum == "gaussian":
        return torch.randn(m, n, generator=gen).to(device), None
    if spectrum != "decay":
        raise ValueError(f"unknown spectrum {spectrum!r}; use 'decay' or 'gaussian'")
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen).to(device)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen).to(device)).Q
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -DECAY_ALPHA
    A = (U * s.to(device, torch.float32)) @ V.mT
    return A.contiguous(), s


def accuracy(A: torch.Tensor, U, S, Vh, s_ref: torch.Tensor, k: int) -> dict[str, float]:
    U, S, Vh = (torch.as_tensor(x).to(A.device) for x in (U, S, Vh))
    U, S, Vh = U[:, :k].float(), S[:k].float(), Vh[:k].float()
    err = float(torch.linalg.vector_norm(A - (U * S) @ Vh, dtype=torch.float64))
    opt = float(s_ref[k:].square().sum().sqrt())
    top = s_ref[:k]
    rel = ((S.double().cpu() - top).abs() / top).max()
    return {"error_ratio": err / opt if opt > 0 else math.nan, "sv_rel_error": float(rel)}


def floor_runner(A: torch.Tensor, k: int, n_iter: int = 2) -> tuple[Callable[[], None], int, int]:
    """The bare products of svdkit's Krylov plan for ``(A, k, n_iter)``: (runner, passes, width).

    For ``n_iter="auto"`` pass the steps the call made (``RandomizedSVDInfo.n_iter``).
    """
    width, q, exact = _plan(A.shape, k, OVERSAMPLES, n_iter, "krylov")
    if exact:
        return (lambda: None), 0, width
    m, n = A.shape
    X = A.mT if m > n else A  # svdkit works on the short side
    r, c = X.shape
    gen = torch.Generator().manual_seed(0)
    right = torch.randn(c, width, generator=gen).to(A.device)
    left = torch.randn(r, width, generator=gen).to(A.device)

    def run() -> None:
        for _ in range(q + 1):
            X @ right
            X.mT @ left

    return run, 2 * (q + 1), width


def bench_matrix(shape, spectrum, ranks, args) -> list[dict[str, Any]]:
    device = args.device
    start = time.perf_counter()
    A, s_known = make_matrix(shape, spectrum, args.seed, device)
    sync(device)
    log(f"[{shape[0]}x{shape[1]} {spectrum}] built in {time.perf_counter() - start:.1f} s")

    t_exact, (Ue, Se, Vhe) = best_of(lambda: torch.linalg.svd(A, full_matrices=False), args.exact_repeats, warmup=0, device=device)
    s_ref = s_known if s_known is not None else Se.double().cpu()
    log(f"[{shape[0]}x{shape[1]} {spectrum}] exact SVD {t_exact:.2f} s")
    A_np = A.cpu().numpy() if not args.no_sklearn else None

    rows = []
    for k in ranks:
        if k >= min(shape):
            log(f"skip k={k}: not below min(m, n) for {shape}")
            continue
        base = {"shape": f"{shape[0]}x{shape[1]}", "spectrum": spectrum, "k": k}
        # The steps n_iter="auto" takes for this matrix (deterministic for the seed), so the floor
        # is the one of the call being timed.
        _, info = randomized_svd(A, k, seed=args.seed, return_info=True)
        auto_steps = info.n_iter if info.method == "krylov" else FIXED_N_ITER  # "exact": no passes either way
        floors = {n_iter: floor_runner(A, k, n_iter) for n_iter in dict.fromkeys([auto_steps, FIXED_N_ITER])}

        def lowrank():
            torch.manual_seed(args.seed)
            U, S, V = torch.svd_lowrank(A, q=k + OVERSAMPLES, niter=2)
            return U, S, V.mT

        fns: dict[str, Callable[[], Any]] = {
            "svdkit": lambda: randomized_svd(A, k, seed=args.seed, return_info=True),
            f"svdkit n_iter={FIXED_N_ITER}": lambda: randomized_svd(A, k, seed=args.seed, n_iter=FIXED_N_ITER, return_info=True),
        }
        if A_np is not None:
            from sklearn.utils.extmath import randomized_svd as sk_randomized_svd

            fns["sklearn"] = lambda: sk_randomized_svd(A_np, k, random_state=args.seed)
        fns["svd_lowrank"] = lowrank
        for n_iter, (run, _, _) in floors.items():
            fns[f"floor q={n_iter}"] = run
        timed = best_of_interleaved(fns, args.repeats, device=device)
        t_floors = {n_iter: timed.pop(f"floor q={n_iter}")[0] for n_iter in floors}
        timed["exact"] = (t_exact, (Ue, Se, Vhe))
        t_sklearn = timed["sklearn"][0] if "sklearn" in timed else None
        for method, (t, out) in timed.items():
            row = dict(base, method=method, time_s=t)
            if method.startswith("svdkit"):
                factors, run_info = out
                row["passes"] = run_info.passes
                steps = run_info.n_iter if run_info.method == "krylov" else FIXED_N_ITER
                t_floor = t_floors.get(steps)
                row["floor_ratio"] = t / t_floor if t_floor else None
            else:
                factors = out
                row["passes"] = other_passes(method, k, shape)
                t_floor = t_floors[auto_steps]
                row["floor_ratio"] = t / t_floor if t_floor > 0 else None
            row["speedup_vs_sklearn"] = t_sklearn / t if t_sklearn else None
            row.update(accuracy(A, *factors, s_ref, k))
            rows.append(row)
        for n_iter, (_, passes, width) in floors.items():
            rows.append(dict(base, method=f"floor ({passes} x {width})", time_s=t_floors[n_iter], passes=passes, floor_ratio=1.0))
        svdkit_row = next(r for r in rows if r["k"] == k and r["method"] == "svdkit")
        log(
            f"[{shape[0]}x{shape[1]} {spectrum} k={k}] svdkit {svdkit_row['time_s']:.3f} s ({svdkit_row['passes']} passes), "
            f"floor {t_floors[auto_steps]:.3f} s, sklearn {t_sklearn if t_sklearn is not None else float('nan'):.3f} s, "
            f"error ratio {svdkit_row['error_ratio']:.5f}"
        )
    return rows


def other_passes(method: str, k: int, shape: tuple[int, int]) -> int | None:
    """Products with ``A`` or ``A^T`` the other methods make (None for the exact SVD)."""
    if method == "sklearn":  # n_iter="auto": 7 if k < 0.1 min(m, n), else 4; each step two passes
        return 2 * ((7 if k < 0.1 * min(shape) else 4) + 1)
    if method == "svd_lowrank":  # niter=2
        return 6
    return None


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target and case (decaying spectra, svdkit defaults): met or missed."""
    lines = []
    for row in rows:
        if row["method"] != "svdkit" or row["spectrum"] != "decay":
            continue
        case = f"{row['shape']} k={row['k']}"
        ok = row["error_ratio"] <= TARGET_ERROR_RATIO
        lines.append(f"{case}: error {row['error_ratio']:.5f}x optimal (target <= {TARGET_ERROR_RATIO}) {'met' if ok else 'MISSED'}")
        ok = row["floor_ratio"] <= TARGET_FLOOR_RATIO
        lines.append(f"{case}: {row['floor_ratio']:.2f}x the matrix-product floor (target <= {TARGET_FLOOR_RATIO}) {'met' if ok else 'MISSED'}")
        shape = tuple(int(x) for x in row["shape"].split("x"))
        if (shape, row["k"]) in TARGET_SPEEDUP_CASES and row.get("speedup_vs_sklearn") is not None:
            ok = row["speedup_vs_sklearn"] >= TARGET_SPEEDUP
            lines.append(f"{case}: {row['speedup_vs_sklearn']:.2f}x faster than sklearn (target >= {TARGET_SPEEDUP}) {'met' if ok else 'MISSED'}")
    return lines


COLUMNS = [
    ("shape", "shape", ""),
    ("spectrum", "spectrum", ""),
    ("k", "k", ""),
    ("method", "method", ""),
    ("passes", "passes", ""),
    ("time_s", "time (s)", ".3f"),
    ("speedup_vs_sklearn", "speed-up vs sklearn", ".2f"),
    ("floor_ratio", "time / floor", ".2f"),
    ("error_ratio", "Frobenius error / optimal", ".5f"),
    ("sv_rel_error", "max rel. error of top-k s", ".2e"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=None, help=f"comma-separated MxN (default {DEFAULT_SHAPES})")
    parser.add_argument("--ranks", default=None, help=f"comma-separated ranks k (default {DEFAULT_RANKS})")
    parser.add_argument("--spectra", default="decay,gaussian", help="comma-separated: decay, gaussian")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (one call of each method, in turn); the best is reported")
    parser.add_argument("--exact-repeats", type=int, default=1, help="timed calls of the exact SVD (slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device for svdkit, svd_lowrank, exact and floor")
    parser.add_argument("--no-sklearn", action="store_true", help="leave scikit-learn out")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and NumPy's BLAS (default: the libraries' own)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the machine description here")
    parser.add_argument("--quick", action="store_true", help=f"small grid ({QUICK_SHAPES}; k {QUICK_RANKS}; 2 repeats)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes or QUICK_SHAPES
        args.ranks = args.ranks or QUICK_RANKS
        args.repeats = min(args.repeats, 2)
    args.shapes = args.shapes or DEFAULT_SHAPES
    args.ranks = args.ranks or DEFAULT_RANKS
    if torch.device(args.device).type != "cpu" and not args.no_sklearn:
        log("scikit-learn runs on the CPU only; leaving it out for a non-CPU device")
        args.no_sklearn = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is None:
        return run(args, argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            log("threadpoolctl is not installed: --threads applies to torch only")
            return run(args, argv)
        with threadpool_limits(args.threads):
            return run(args, argv)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    shapes = parse_shapes(args.shapes)
    ranks = parse_ints(args.ranks)
    spectra = [s for s in args.spectra.split(",") if s]
    machine = machine_info(args.device)
    log(f"machine: {machine}")
    # Warm up the libraries once so the first timed case does not pay for their start-up.
    warm = torch.randn(256, 256, device=args.device)
    torch.linalg.svd(warm)
    randomized_svd(warm, 8, seed=0)
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        for spectrum in spectra:
            rows.extend(bench_matrix(shape, spectrum, ranks, args))
    machine["load_average_1m_end"] = machine_info(args.device).get("load_average_1m")
    print(format_table(rows, COLUMNS))
    targets = check_targets(rows)
    if targets:
        print()
        print("\n".join(targets))
    if args.json:
        write_json(args.json, {"command": " ".join(["python", "benchmarks/svd_speed.py", *(argv if argv is not None else sys.argv[1:])]), "machine": machine, "rows": rows, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
