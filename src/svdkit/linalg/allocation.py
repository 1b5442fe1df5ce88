"""Sharing a parameter budget among matrices: ranks in multiples, under per-matrix caps.

:func:`allocate_ranks` is the global budget's allocator; :func:`round_rank` puts one rank on the
multiples a device prefers. Both are pure arithmetic on spectra and costs.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ._tensor import Array, to_tensor

__all__ = ["allocate_ranks", "round_rank"]


def _check_multiple(multiple: object) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"rank multiple: expected an int >= 1, got {multiple!r}")
    return multiple


def round_rank(rank: int, multiple: int, full: int) -> int | None:
    """``rank`` rounded down to a multiple of ``multiple`` (at least one multiple), or None when
    no multiple fits in the full rank ``full`` (a matrix whose ``min(m, n)`` is below it).

    Raises
    ------
    ValueError
        A ``multiple`` that is not an int >= 1, or a ``rank`` below 1.
    """
    multiple = _check_multiple(multiple)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if multiple > full:
        return None
    return max(multiple, min(rank, full) // multiple * multiple)


def _chunk_gains(gains: torch.Tensor, multiple: int, limit: int) -> torch.Tensor:
    """The error removed by each block of ``multiple`` components, the first ``limit`` blocks."""
    return gains[: limit * multiple].reshape(limit, multiple).sum(1) if limit > 0 else gains.new_zeros(0)


def allocate_ranks(
    spectra: Sequence[Array],
    rank_costs: Sequence[int],
    dense_costs: Sequence[int],
    budget: int,
    *,
    min_rank: int = 1,
    multiple: int | Sequence[int] = 1,
    max_ranks: Sequence[int | None] | None = None,
) -> list[int | None]:
    """Share a parameter budget among matrices by the error each rank removes per parameter.

    Parameters
    ----------
    spectra : sequence of Tensor or ndarray of shape (r_i,)
        Singular values per matrix, descending, in units that are comparable across matrices
        (``s**2`` is the error a component removes, e.g. after whitening by the model-output
        sensitivity).
    rank_costs : sequence of int
        Parameters one more rank costs (``m + n`` for a matrix).
    dense_costs : sequence of int
        Parameters of the matrix kept dense (``m * n``).
    budget : int
        Total parameters allowed over all matrices.
    min_rank : int
        Every factorized matrix keeps at least this rank (rounded up to its multiple).
    multiple : int or sequence of int
        Every rank is a multiple of this (one for all matrices, or one per matrix): ranks are
        bought that many components at a time.
    max_ranks : sequence of (int or None), optional
        The largest rank each matrix may take (None: no cap), e.g. the largest rank at which
        its factorized form runs faster than the dense one. A matrix whose cap is below the
        smallest rank it could take stays dense.

    Returns
    -------
    list of (int or None)
        The rank of each matrix, or None where it stays dense: where keeping it dense costs no
        more than its factorization would (then it is exact at no extra cost), where its cap
        allows no rank, or where going dense instead of stopping at its cap removes more error
        for the budget than the ranks the extra parameters would otherwise buy.

    Raises
    ------
    ValueError
        If the budget cannot pay for the dense matrices and ``min_rank`` everywhere else, the
        inputs disagree in length, or ``multiple`` is not an int >= 1.

    Notes
    -----
    Greedy on ``gain / cost`` over blocks of ``multiple`` components, taken in that order while
    the budget lasts (each matrix's blocks are taken in order because its spectrum descends);
    blocks with zero gain are never bought, so the budget may be left partly unspent. Matrices
    whose rank reaches the break-even point are switched to dense and the freed parameters are
    shared again, until nothing changes. A matrix held at its cap is switched to dense when that
    lowers the total error left at the same budget (tried in the order of the error each
    switch removes per extra parameter).
    """
    count = len(spectra)
    multiples = [_check_multiple(m) for m in ([multiple] * count if isinstance(multiple, int) and not isinstance(multiple, bool) else list(multiple))]
    caps = list(max_ranks) if max_ranks is not None else [None] * count
    if not (len(rank_costs) == len(dense_costs) == len(caps) == len(multiples) == count):
        raise ValueError(f"got {count} spectra, {len(rank_costs)} rank costs, {len(dense_costs)} dense costs, "
                         f"{len(caps)} caps and {len(multiples)} multiples")
    gains = [to_tensor(S)[0].detach().to("cpu", torch.float64).square() for S in spectra]
    firsts = [max(1, math.ceil(min_rank / m)) for m in multiples]  # blocks every factorized matrix keeps
    limits = []  # blocks each matrix may take
    for g, cap, m in zip(gains, caps, multiples):
        allowed = len(g) if cap is None else min(len(g), max(int(cap), 0))
        limits.append(allowed // m)
    chunks = [_chunk_gains(g, m, limit) for g, m, limit in zip(gains, multiples, limits)]
    forced = {i for i in range(count) if limits[i] < firsts[i]}
    step = [m * c for m, c in zip(multiples, rank_costs)]  # parameters of one block

    def greedy(dense: set[int]) -> tuple[dict[int, int], float]:
        """Blocks per active matrix and the error left (dense matrices leave none)."""
        active = [i for i in range(count) if i not in dense]
        remaining = budget - sum(dense_costs[i] for i in dense) - sum(firsts[i] * step[i] for i in active)
        if remaining < 0:
            smallest = sorted({firsts[i] * multiples[i] for i in active}) or [min_rank]
            raise ValueError(
                f"a budget of {budget:,} parameters cannot keep rank {'/'.join(map(str, smallest))} in all {count} matrices "
                f"(needs {budget - remaining:,}{f', {len(dense)} of them dense' if dense else ''})"
            )
        blocks = {i: firsts[i] for i in active}
        extra = [i for i in active if limits[i] > firsts[i]]
        if extra:
            owner = torch.cat([torch.full((limits[i] - firsts[i],), i, dtype=torch.long) for i in extra])
            value = torch.cat([chunks[i][firsts[i]:] / step[i] for i in extra])
            cost = torch.tensor([step[i] for i in owner.tolist()], dtype=torch.float64)
            order = torch.sort(value, descending=True, stable=True).indices
            order = order[value[order] > 0]  # a block that removes no error is not worth a parameter
            affordable = int((cost[order].cumsum(0) <= remaining).sum())
            for i in owner[order[:affordable]].tolist():
                blocks[i] += 1
        left = sum(float(gains[i][blocks[i] * multiples[i]:].sum()) for i in active)
        return blocks, left

    dense = set(forced)
    for _ in range(count + 1):  # break-even: a matrix whose rank costs its dense size goes dense
        blocks, left = greedy(dense)
        newly_dense = {i for i, b in blocks.items() if b * step[i] >= dense_costs[i]}
        if not newly_dense:
            break
        dense |= newly_dense
    # A matrix stopped by its cap may be worth its dense form: try the best switches first.
    tried: set[int] = set()
    while True:
        held = [i for i, b in blocks.items() if b == limits[i] and caps[i] is not None and i not in tried]
        if not held:
            break
        density = {i: float(gains[i][blocks[i] * multiples[i]:].sum()) / max(dense_costs[i] - blocks[i] * step[i], 1) for i in held}
        best = max(held, key=lambda i: density[i])
        tried.add(best)
        try:
            trial_blocks, trial_left = greedy(dense | {best})
        except ValueError:  # the budget cannot pay for it
            continue
        if trial_left < left:
            dense.add(best)
            blocks, left = trial_blocks, trial_left
        else:
            break
    return [None if i in dense else blocks[i] * multiples[i] for i in range(count)]
