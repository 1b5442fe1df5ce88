"""How close a compressed model's embeddings stay to the original's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["embedding_agreement"]


def embedding_agreement(reference: torch.Tensor, candidate: torch.Tensor, *, k: int = 10) -> dict[str, float]:
    """Mean cosine and top-``k`` neighbour overlap between two embeddings of the same texts.

    Parameters
    ----------
    reference, candidate : Tensor of shape (n, d)
        Row ``i`` of both embeds the same text.
    k : int
        Neighbours per text (itself excluded); needs ``n > k``.

    Returns
    -------
    dict
        ``mean_cosine``: mean over texts of cos(reference_i, candidate_i);
        ``neighbour_overlap``: mean fraction of each text's ``k`` nearest neighbours (by cosine,
        within its own embedding set) that both embeddings share.
    """
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ValueError(f"expected two (n, d) embeddings of the same shape, got {tuple(reference.shape)} and {tuple(candidate.shape)}")
    n = reference.shape[0]
    if n <= k:
        raise ValueError(f"neighbour overlap at k={k} needs more than {k} texts, got {n}")
    ref, cand = F.normalize(reference.double(), dim=1), F.normalize(candidate.double(), dim=1)
    cosine = (ref * cand).sum(dim=1).mean().item()

    def neighbours(E: torch.Tensor) -> torch.Tensor:
        sims = E @ E.T
        sims.fill_diagonal_(-float("inf"))
        return sims.topk(k, dim=1).indices

    a, b = neighbours(ref), neighbours(cand)
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1).double() / k
    return {"mean_cosine": cosine, "neighbour_overlap": shared.mean().item()}
