"""Block-by-block compression of a model that is a stack of blocks (decoder LLMs).

The whole model never runs at once and no more than one block's statistics are held in memory.

**Pass 1 — curvature and spectra** (when the method needs output gradients, ``fisher``, or the
config a global budget). On the first ``gradient_batches`` calibration batches: run the dense
blocks one after another, keeping each block's input on disk; take the gradient of the objective
(for a causal LM, the log-likelihood of the true next tokens) at the last block's output; then
sweep back: re-run each block with gradients on its kept input, push the gradient at its output
back to its input, and let hooks record each target layer's input Gram and output-gradient
Gram. Those give each layer's spectrum in the method's metric (all the budget needs); the
output-gradient Grams are kept on disk for pass 2.

**Pass 2 — compression.** Cache the first block's inputs for every calibration batch, then for
each block: collect its layers' input Grams from the cached inputs (so each block is fitted to
what the *compressed* model feeds it), factorize each layer with the method (output-gradient
Grams from pass 1), take the ranks (the global allocation of pass 1, or the per-layer spec),
replace the layers, and run the compressed block to produce the next block's inputs.

Blocks can live on the CPU and visit ``device`` only while they are processed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..calibrate import GradientRecorder, InputRecorder, InputStats
from ..distributed import Group, shard_count
from ..layers.lowrank import low_rank_from_spec
from ..progress import ProgressLike, track
from ..surgery import check_patterns, replace_module
from ..views import weight_matrix
from .blocks import BlockHome, BlockInput, BlockStack, capture_block_inputs, head_loss_gradient, run_block
from .config import CompressConfig
from .methods import transformed_spectrum
from .plan import layer_transforms, plan_layer
from .ranks import LayerCost, choose_ranks
from .report import LayerReport
from .spill import Spill
from .stats import LayerStats, output_objectives

__all__ = ["BlockRun", "Curvature", "Resume", "compress_blocks", "measure_curvature"]


@dataclass
class LayerSpectrum(LayerCost):
    """A layer's spectrum measured in pass 1, before it is factorized (a rank candidate)."""

    name: str
    shape: tuple[int, int]
    groups: int
    values: list[torch.Tensor]
    importance: float = 1.0

    @property
    def singular_values(self) -> torch.Tensor:
        return self.values[0]

    def spectrum(self) -> torch.Tensor:
        return torch.stack(self.values).square().sum(0).sqrt() * self.importance


@dataclass
class BlockRun:
    """What the block-by-block pipeline did, for the report.

    Attributes
    ----------
    blocks : int
    gradient_batches : int
        Calibration batches of pass 1 (0 when it did not run).
    seconds : dict of str -> float
        Wall time of ``"curvature"`` (pass 1) and ``"compression"`` (pass 2).
    """

    blocks: int = 0
    gradient_batches: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def _block_targets(stack: BlockStack, targets: list[tuple[str, nn.Module]]) -> dict[int, list[tuple[str, nn.Module]]]:
    by_block: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in targets:
        index = stack.index_of(name)
        assert index is not None  # find_blocks checked that every target is inside a block
        by_block.setdefault(index, []).append((name, module))
    return by_block


def _curvature_pass(
    model: nn.Module,
    stack: BlockStack,
    by_block: dict[int, list[tuple[str, nn.Module]]],
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] | None,
    config: CompressConfig,
    curvature: str | None,
    spill: Spill,
    home: BlockHome,
    progress: ProgressLike,
    group: Group,
    owners: dict[str, int],
) -> dict[str, LayerSpectrum]:
    """Pass 1 (see the module docstring): the spectrum of every target; output-gradient Grams spilled.

    ``curvature`` None: no gradients (input Grams only, for a budget on a one-sided method).
    With several ranks, ``batches`` is this rank's share; statistics are summed over the ranks,
    each layer's owner measures its spectrum and keeps its gradient statistics.
    """
    with group.checked():
        inputs = capture_block_inputs(model, stack, batches, forward, device=home.device, first=group.rank, step=group.world)
        hidden = [item.hidden for item in inputs]
        first = min(by_block) if by_block else len(stack.blocks)  # blocks before the first target need no gradients
        with torch.no_grad():
            for index in track(range(len(stack.blocks)), progress, desc="curvature: forward"):
                if index >= first:
                    spill.put(f"boundary-{index}", hidden)
                with home.visit(stack, index) as block:
                    hidden = [run_block(block, item, h) for item, h in zip(inputs, hidden)]
        grads: list[torch.Tensor] | None = None
        if curvature is not None:
            generator = torch.Generator().manual_seed(config.seed)

            def objective(result, batch):
                return output_objectives(result, batch, curvature, config.probes, generator)

            grads = [head_loss_gradient(model, stack, batch, h, objective, forward) for batch, h in zip(batches, hidden)]
        del hidden
    spectra: dict[str, LayerSpectrum] = {}
    for index in track(list(reversed(range(first, len(stack.blocks)))), progress, desc="curvature: backward"):
        targets = by_block.get(index, [])
        mine: dict[str, LayerSpectrum] = {}
        with home.visit(stack, index) as block:
            with group.checked():
                boundary = spill.get(f"boundary-{index}")
                spill.drop(f"boundary-{index}")
                input_stats, gradient_stats, grads = _sweep_block(block, targets, inputs, boundary, grads)
            group.sum_statistics([input_stats[n] for n, _ in targets] + [gradient_stats[n] for n, _ in targets if n in gradient_stats])
            with group.checked():
                for name, module in targets:
                    if owners[name] != group.rank:
                        continue
                    transforms = layer_transforms(module, LayerStats(input_stats[name], gradient_stats.get(name)), config)
                    mine[name] = LayerSpectrum(
                        name, tuple(transforms[0].M.shape), len(transforms), [transformed_spectrum(t) for t in transforms],
                        transforms[0].importance,
                    )
                owned = {name: stats for name, stats in gradient_stats.items() if owners[name] == group.rank}
                if owned:
                    spill.put_statistics(f"gradients-{index}", owned)
        for part in group.gather_objects(mine):
            spectra.update(part)
    return spectra


def _sweep_block(
    block: nn.Module,
    targets: list[tuple[str, nn.Module]],
    inputs: list[BlockInput],
    boundary: list[torch.Tensor],
    grads: list[torch.Tensor] | None,
) -> tuple[dict[str, InputStats], dict[str, InputStats], list[torch.Tensor] | None]:
    """Run ``block`` on its inputs, recording its targets' input Grams; with ``grads`` (the
    gradients at the block's output), also their output-gradient Grams, and return the gradients
    at the block's input."""
    new_grads: list[torch.Tensor] = []
    with InputRecorder(targets) as inputs_seen, GradientRecorder(targets) as gradients_seen:
        for index, (item, h) in enumerate(zip(inputs, boundary)):
            inputs_seen.next_batch(item.index)
            gradients_seen.next_batch(item.index)
            if grads is None:
                with torch.no_grad():
                    run_block(block, item, h)
                continue
            with torch.enable_grad():
                x = h.detach().requires_grad_(True)
                y = run_block(block, item, x)
                (gx,) = torch.autograd.grad(y, x, grad_outputs=grads[index].to(y.device, y.dtype))
            new_grads.append(gx.detach())
    inputs_seen.check_reached()
    return inputs_seen.stats, gradients_seen.stats, new_grads if grads is not None else None


def _compression_pass(
    out: nn.Module,
    stack: BlockStack,
    by_block: dict[int, list[tuple[str, nn.Module]]],
    batches: list[Any],
    forward: Callable[[nn.Module, Any], Any] | None,
    config: CompressConfig,
    ranks: dict[str, int | None] | None,
    spill: Spill | None,
    home: BlockHome,
    progress: ProgressLike,
    group: Group,
    owners: dict[str, int],
    resume: Resume | None = None,
) -> list[LayerReport]:
    """Pass 2 (see the module docstring) on ``out``, in place; returns the report rows.

    With several ranks, ``batches`` is this rank's share: input statistics are summed over the
    ranks, each layer's owner factorizes it and sends the factors to every rank, and every rank
    runs the compressed block on its share. ``resume`` starts at a later block, from kept inputs,
    and is told when each block is done.
    """
    with group.checked():
        if resume is not None and resume.inputs is not None:
            inputs = resume.inputs
        else:
            inputs = capture_block_inputs(out, stack, batches, forward, device=home.device, first=group.rank, step=group.world)
    rows: list[LayerReport] = list(resume.rows) if resume is not None else []
    start = resume.start if resume is not None else 0
    last = max(by_block) if by_block else -1  # blocks after the last target need not run
    for index in track(range(start, last + 1), progress, desc="blocks compressed"):
        targets = by_block.get(index, [])
        with home.visit(stack, index) as block:
            block_rows = []
            if targets:
                with group.checked():
                    input_stats, _, _ = _sweep_block(block, targets, inputs, [item.hidden for item in inputs], None)
                group.sum_statistics([input_stats[name] for name, _ in targets])
                with group.checked():
                    built = _factorize_owned(targets, input_stats, index, config, ranks, spill, group, owners)
                built = _share_layers(built, targets, group, owners)
                with group.checked():
                    for name, module in targets:
                        row, layer = built[name]
                        if layer is not None:
                            replace_module(out, name, layer)
                        block_rows.append(row)
                del input_stats, built
            with group.checked(), torch.no_grad():
                for item in inputs:
                    item.hidden = run_block(block, item)
            rows.extend(block_rows)
            if resume is not None:
                with group.checked():
                    resume.block_done(index, block, inputs, block_rows)
    return rows


@dataclass
class Resume:
    """Where pass 2 starts and what it is told as it goes (the resumable directory writer).

    Attributes
    ----------
    start : int
        The first block to compress.
    inputs : list of BlockInput or None
        The compressed model's inputs to block ``start`` (None: catch them from the model).
    rows : list of LayerReport
        The report rows of the blocks before ``start``.
    """

    start: int = 0
    inputs: list[BlockInput] | None = None
    rows: list[LayerReport] = field(default_factory=list)

    def block_done(self, index: int, block: nn.Module, inputs: list[BlockInput], rows: list[LayerReport]) -> None:
        """Called while block ``index`` is still in memory, compressed, with the next block's inputs."""


def _factorize_owned(
    targets: list[tuple[str, nn.Module]],
    input_stats: dict[str, InputStats],
    index: int,
    config: CompressConfig,
    ranks: dict[str, int | None] | None,
    spill: Spill | None,
    group: Group,
    owners: dict[str, int],
) -> dict[str, tuple[LayerReport, nn.Module | None]]:
    """This rank's layers of a block, factorized: name -> (report row, low-rank layer or None)."""
    owned = [(name, module) for name, module in targets if owners[name] == group.rank]
    if not owned:
        return {}
    key = f"gradients-{index}"
    gradient_stats = spill.get(key) if spill is not None and (spill.path / f"{key}.pt").exists() else {}
    built = {}
    for name, module in owned:
        plan = plan_layer(name, module, LayerStats(input_stats[name], gradient_stats.get(name)), config)
        k = ranks[name] if ranks is not None else choose_ranks([plan], config, check=False)[0]
        row = plan.report(k)
        built[name] = (row, plan.build(row.rank) if row.rank is not None else None)
    return built


def _share_layers(
    built: dict[str, tuple[LayerReport, nn.Module | None]],
    targets: list[tuple[str, nn.Module]],
    group: Group,
    owners: dict[str, int],
) -> dict[str, tuple[LayerReport, nn.Module | None]]:
    """Every rank's factorized layers on every rank (the owners send report rows, specs and factors)."""
    if not group.active:
        return built
    mine = {name: (row, None if layer is None else (layer.spec(), {k: v.cpu() for k, v in layer.state_dict().items()}))
            for name, (row, layer) in built.items()}
    shared: dict[str, tuple[LayerReport, nn.Module | None]] = {}
    modules = dict(targets)
    for r in sorted(set(owners[name] for name, _ in targets)):
        for name, (row, payload) in group.broadcast_objects(mine if r == group.rank else {}, owner=r).items():
            if payload is None:
                shared[name] = (row, None)
                continue
            spec, state = payload
            dense = modules[name]
            layer = low_rank_from_spec(spec, dense, name=name)
            layer.load_state_dict({k: v.to(dense.weight.device) for k, v in state.items()})
            shared[name] = (row, layer)
    return shared


@dataclass
class Curvature:
    """What pass 1 measured on the dense model, shared by every budget compressed from it.

    Attributes
    ----------
    spectra : dict of name -> LayerSpectrum
        Each target's spectrum in the method's metric.
    spill : Spill or None
        The output-gradient statistics, one file per block (``fisher``).
    seconds : float
    gradient_batches : int
    """

    spectra: dict[str, LayerSpectrum]
    spill: Spill | None
    seconds: float
    gradient_batches: int

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()


def measure_curvature(
    model: nn.Module,
    stack: BlockStack,
    targets: list[tuple[str, nn.Module]],
    batches: list[Any],
    config: CompressConfig,
    *,
    forward: Callable[[nn.Module, Any], Any] | None,
    curvature: str,
    home: BlockHome | None = None,
    progress: ProgressLike = None,
    group: Group = Group(),
    spill: Spill | None = None,
) -> Curvature | None:
    """Pass 1 on the dense ``model`` (see the module docstring), when the method needs output
    gradients (``fisher``) or the config a global budget; None otherwise.

    Parameters
    ----------
    model : nn.Module
    stack : BlockStack
        The blocks of ``model``.
    targets : list of (name, module)
        Target layers of ``model``, all inside the blocks.
    batches : list
        Calibration batches (this rank's share, see ``group``); the curvature comes from the first
        ``config.gradient_batches`` batches of the whole calibration list, whatever the number of
        processes (each rank takes its share of those).
    config : CompressConfig
    forward : callable, optional
        ``forward(module, batch)``.
    curvature : str
        The output statistics of ``fisher`` (see :func:`svdkit.compression.stats.output_objectives`).
    home : BlockHome, optional
        Where the blocks live and the device they visit (default: in memory, where they are).
    progress : bool or callable
    group : Group
        The processes that compress together (:mod:`svdkit.distributed`); ``batches`` is this
        rank's share.
    spill : optional
        Where to keep the gradient statistics (default: a temporary directory).
    """
    needs_gradients = config.method == "fisher"
    if not needs_gradients and config.budget is None:
        return None
    check_patterns(config.rank_pattern, [name for name, _ in targets], field="rank_pattern")
    start = time.perf_counter()
    grad_batches = batches[: shard_count(config.gradient_batches, group, what="gradient_batches")] if config.gradient_batches else batches
    spill = spill or Spill()
    home = home or BlockHome()
    flags = _frozen(model)
    try:
        spectra = _curvature_pass(
            model, stack, _block_targets(stack, targets), grad_batches, forward, config,
            curvature if needs_gradients else None, spill, home, progress, group, layer_owners(targets, group),
        )
    except BaseException:
        spill.close()
        raise
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    if not needs_gradients:
        spill.close()
    return Curvature(spectra, spill if needs_gradients else None, time.perf_counter() - start, len(grad_batches))


def compress_blocks(
    model: nn.Module,
    out: nn.Module,
    stack: BlockStack,
    targets: list[tuple[str, nn.Module]],
    batches: list[Any],
    config: CompressConfig,
    *,
    forward: Callable[[nn.Module, Any], Any] | None,
    measured: Curvature | None,
    home: BlockHome | None = None,
    progress: ProgressLike = None,
    group: Group = Group(),
    resume: Resume | None = None,
) -> tuple[list[LayerReport], BlockRun]:
    """Pass 2: compress ``out`` (a copy of ``model``, or ``model`` itself) block by block, in place.

    Parameters
    ----------
    model : nn.Module
        The dense model.
    out : nn.Module
        Where the factorized layers go.
    stack : BlockStack
        The blocks of ``out`` (:func:`~svdkit.compression.blocks.find_blocks`).
    targets : list of (name, module)
        Target layers of ``model``, all inside the blocks.
    batches : list
        Calibration batches.
    config : CompressConfig
    forward : callable, optional
        ``forward(module, batch)``.
    measured : Curvature or None
        Pass 1 (:func:`measure_curvature`): spectra for a budget, gradients for ``fisher``.
    home : BlockHome, optional
        Where the blocks live and the device they visit (default: in memory, where they are).
    progress : bool or callable
    group : Group
        The processes that compress together; ``batches`` is this rank's share.
    resume : Resume, optional
        Start at a later block and hear about each block done (the directory writer).

    Returns
    -------
    rows : list of LayerReport
        In the order of ``targets``.
    run : BlockRun
    """
    run = BlockRun(blocks=len(stack.blocks))
    check_patterns(config.rank_pattern, [name for name, _ in targets], field="rank_pattern")
    by_block = _block_targets(BlockStack(stack.name, model.get_submodule(stack.name)), targets)
    out_by_block = {i: [(name, out.get_submodule(name)) for name, _ in layers] for i, layers in by_block.items()}
    ranks = None
    if measured is not None:
        run.seconds["curvature"] = measured.seconds
        run.gradient_batches = measured.gradient_batches
        if config.budget is not None:
            candidates = [measured.spectra[name] for name, _ in targets]
            others = sum(p.numel() for p in model.parameters()) - sum(c.dense_params for c in candidates)
            ranks = dict(zip([c.name for c in candidates], choose_ranks(candidates, config, other_params=others, check=False)))
    flags = _frozen(model)
    try:
        start = time.perf_counter()
        rows = _compression_pass(out, stack, out_by_block, batches, forward, config, ranks,
                                 measured.spill if measured is not None else None, home or BlockHome(), progress, group,
                                 layer_owners(targets, group), resume)
        run.seconds["compression"] = time.perf_counter() - start
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    order = {name: i for i, (name, _) in enumerate(targets)}
    rows.sort(key=lambda row: order[row.name])
    return rows, run


def layer_owners(targets: list[tuple[str, nn.Module]], group: Group) -> dict[str, int]:
    """The rank that factorizes each target: costs ``m * n * min(m, n)`` shared evenly."""
    shapes = [tuple(weight_matrix(module).shape) for _, module in targets]
    costs = [m * n * min(m, n) for m, n in shapes]
    return dict(zip([name for name, _ in targets], group.owners(costs)))


def _frozen(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Freeze every parameter (no weight gradients are needed); returns the flags to restore."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    return flags
