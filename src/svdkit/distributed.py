"""torch.distributed for svdkit: one process is the special case of K processes.

Launched with ``torchrun --nproc_per_node=K -m svdkit compress ...`` (gloo on CPUs, NCCL with
one GPU per process, ``cuda:LOCAL_RANK``), the compression pipeline shards the calibration data
by rank, sums each layer's statistics (float64) onto the rank that owns the layer, lets owners
factorize and broadcast the factors, and has every rank run the compressed block on its shard.
Without torchrun (or with one process) every function here is the identity.

Owners are chosen by longest-processing-time bin packing of the factorization cost
``m * n * min(m, n)``, so K ranks share the SVDs evenly. A failure on one rank is shared at the
next check point: every rank raises, with the failing rank's message, so nothing hangs in a
collective and no rank writes a half result.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

__all__ = ["Group", "RankFailure", "current_group", "init_from_env", "leave_group", "shard", "shard_count"]


class RankFailure(RuntimeError):
    """Another rank failed; this one stops too (the message is the failing rank's)."""


@dataclass(frozen=True)
class Group:
    """The processes that compress one model together.

    Attributes
    ----------
    rank, world : int
        This process and how many there are (0 and 1 without torch.distributed).
    device : torch.device
        This rank's compute device (``cuda:LOCAL_RANK`` with NCCL, the CPU with gloo).
    """

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        """Whether there is more than one process."""
        return self.world > 1

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that owns each item: the largest cost goes to the least loaded rank (LPT)."""
        loads = [(0.0, r) for r in range(self.world)]
        heapq.heapify(loads)
        owner = [0] * len(costs)
        for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            load, r = heapq.heappop(loads)
            owner[index] = r
            heapq.heappush(loads, (load + float(costs[index]), r))
        return owner

    def sum_statistics(self, stats: Sequence[Any]) -> None:
        """Sum streamed statistics (:class:`svdkit.calibrate.GramStats`: ``gram``, ``abs_sum``,
        ``count``) over the ranks, in place, float64. Each object is summed once, however many
        layers share it; every rank calls this with the same objects in the same order."""
        if not self.active:
            return
        import torch.distributed as dist

        unique = list({id(s): s for s in stats}.values())
        for s in unique:
            gram, abs_sum = s.gram.to(self.device), s.abs_sum.to(self.device)
            dist.all_reduce(gram)
            dist.all_reduce(abs_sum)
            s.gram, s.abs_sum = gram.to(s.gram.device), abs_sum.to(s.abs_sum.device)
            s._whitening.clear()
        for s, count in zip(unique, self.sum_ints([s.count for s in unique])):
            s.count = count

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        """Integers summed over the ranks (token counts)."""
        return [int(v) for v in self._summed(values, torch.int64)]

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Floats summed over the ranks (float64: errors' numerators and denominators)."""
        return [float(v) for v in self._summed(values, torch.float64)]

    def _summed(self, values: Sequence[float], dtype: torch.dtype) -> list:
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=dtype, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Each parameter's gradient summed over the ranks, in place (one all-reduce; a rank with
        no gradient contributes zeros), so that every rank takes the same optimizer step."""
        if not self.active:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dtype = functools.reduce(torch.promote_types, [g.dtype for g in grads])
        flat = torch.cat([g.reshape(-1).to(self.device, dtype) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view(g.shape).to(p.device, p.dtype)
            offset += g.numel()

    def broadcast_objects(self, values: list[Any], owner: int) -> list[Any]:
        """``owner``'s list of picklable objects on every rank."""
        if not self.active:
            return values
        import torch.distributed as dist

        box = [values if self.rank == owner else None]
        dist.broadcast_object_list(box, src=owner, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    @contextlib.contextmanager
    def checked(self) -> Iterator[None]:
        """A step that every rank runs: when it fails on any rank, every rank raises at its end
        (see :meth:`check`); nothing waits for a rank that is gone."""
        try:
            yield
        except Exception as exc:
            self.check(exc)
            raise
        self.check(None)

    def check(self, error: BaseException | None) -> None:
        """A check point: if any rank failed, every rank raises (``error`` itself on the rank that
        failed, :class:`RankFailure` with its message elsewhere)."""
        if not self.active:
            if error is not None:
                raise error
            return
        reports = self.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, message) for r, message in enumerate(reports) if message is not None]
        if not failed:
            return
        if error is not None:
            raise error
        r, message = failed[0]
        raise RankFailure(f"rank {r} of {self.world} failed: {message}")


def current_group() -> Group:
    """The group of an initialized default process group, or the one-process group."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return Group()
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return Group(dist.get_rank(), dist.get_world_size(), device)


_joined: list[bool] = []  # [True] while a group that init_from_env created is open


def init_from_env(backend: str | None = None, *, timeout_seconds: float = 1800.0) -> Group:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Parameters
    ----------
    backend : {"gloo", "nccl"}, optional
        Default: NCCL when CUDA is available (one GPU per local rank), gloo otherwise.
    timeout_seconds : float
        How long a collective may wait for a rank before failing.

    Returns
    -------
    Group
        The one-process group when ``WORLD_SIZE`` is unset or 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_seconds))
        _joined.append(True)
    return current_group()


def leave_group(*, succeeded: bool) -> None:
    """Leave the process group that :func:`init_from_env` joined (a no-op otherwise).

    After success the ranks first wait for each other, so that none exits while another still
    talks to it; after a failure they do not (the others may be gone). Then the group is
    destroyed before the interpreter exits: torch's communication threads stopped in order,
    not torn down with the process.
    """
    if not _joined:
        return
    import torch.distributed as dist

    _joined.clear()
    if not dist.is_initialized():
        return
    try:
        if succeeded:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def shard(items: Sequence[Any], group: Group) -> list[Any]:
    """This rank's disjoint share of ``items`` (every ``world``-th, starting at ``rank``).

    Raises
    ------
    ValueError
        If there are fewer items than ranks: every rank needs data.
    """
    items = list(items)
    if group.active and len(items) < group.world:
        raise ValueError(f"{len(items)} calibration batch(es) cannot be shared by {group.world} processes: give at least one each")
    return items[group.rank::group.world]


def shard_count(total: int, group: Group, *, what: str = "items") -> int:
    """How many of the first ``total`` items of a list this rank's :func:`shard` holds, so that
    the ranks together take exactly those ``total`` items, as one process would.

    Raises
    ------
    ValueError
        If ``total`` is smaller than the number of ranks: every rank needs one (the message
        names ``what``).
    """
    if total < group.world:
        raise ValueError(f"{what}={total} cannot be shared by {group.world} processes: give at least {group.world}")
    return len(range(group.rank, total, group.world))
