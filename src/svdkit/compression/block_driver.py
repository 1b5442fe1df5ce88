"""The block-by-block pipeline of a model that is a stack of blocks (decoder LLMs).

The whole model never runs at once and no more than one block's statistics are held in memory.
:class:`BlockDriver` holds what both passes share (the compressor, the stack, the targets of each
block, the calibration batches, where blocks live, the torchrun group and each layer's owner);
the passes read as its methods:

**Pass 1 — the dense model's spectra** (:meth:`BlockDriver.measure`: when the method needs
output gradients, or the config a global budget). On the first ``gradient_batches`` calibration
batches: run the dense blocks one after another, keeping each block's input on disk; take the
gradient of the objective (the curvature estimate, e.g. the log-likelihood of the true next
tokens) at the last block's output; then sweep back: re-run each block with gradients on its
kept input, push the gradient at its output back to its input, and let the compressor's recorders
take each target's input Gram and output-gradient Gram. Those give each layer's spectrum in the
method's metric (all the budget needs); the output-gradient Grams are kept on disk for pass 2.

**Pass 2 — compression** (:meth:`BlockDriver.compress`). Cache the first block's inputs for
every calibration batch, then for each block: record its targets' input Grams on the cached
inputs (so each block is fitted to what the *compressed* model feeds it), factorize each layer
(output-gradient Grams from pass 1), take the ranks (pass 1's global allocation, or the per-layer
spec), replace the layers, and run the compressed block to produce the next block's inputs.

With several torchrun ranks each rank holds its share of the batches: statistics are summed over
the ranks (float64), each layer's owner factorizes it and sends the factors to every rank, and
every rank runs the compressed block on its share. Blocks live where :class:`BlockHome` keeps
them (in memory, or in a checkpoint read one block at a time) and visit the compute device only
while they are processed.

The closed-form refit is not available here (see
:data:`svdkit.compression.config.REFIT_NEEDS_THE_WHOLE_MODEL`); layer-wise distillation runs after either pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..distributed import Group, shard_count
from ..layers.lowrank import low_rank_from_spec
from ..progress import ProgressLike, track
from ..surgery import check_patterns, replace_module
from ..views import weight_matrix
from .blocks import BlockHome, BlockInput, BlockStack, capture_block_inputs, head_loss_gradient, run_block
from .compressor import LayerCompressor, LayerSpectrum, Recording
from .refine import BlockRefinement, refine_block
from .report import LayerReport
from .spill import Spill
from .statistics import LayerStats

__all__ = ["BlockDriver", "BlockRun", "DenseMeasurements", "Resume"]

Targets = list[tuple[str, nn.Module]]


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
    refinement : list of BlockRefinement
        What block refinement did to each block (empty without it).
    """

    blocks: int = 0
    gradient_batches: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    refinement: list[BlockRefinement] = field(default_factory=list)


@dataclass
class DenseMeasurements:
    """What pass 1 measured on the dense model, shared by every budget compressed from it.

    Attributes
    ----------
    spectra : dict of name -> LayerSpectrum
        Each target's spectrum in the method's metric.
    spill : Spill or None
        The output-gradient statistics, one file per block (methods that need gradients).
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
    dense : list of Tensor or None
        The dense model's inputs to block ``start`` (block refinement toward the dense outputs).
    """

    start: int = 0
    inputs: list[BlockInput] | None = None
    rows: list[LayerReport] = field(default_factory=list)
    dense: list[torch.Tensor] | None = None

    def block_done(self, index: int, block: nn.Module, inputs: list[BlockInput], rows: list[LayerReport], *,
                   dense: list[torch.Tensor] | None, refinement: BlockRefinement | None) -> None:
        """Called while block ``index`` is still in memory, compressed, with the next block's inputs
        (and the dense model's, when block refinement needs them) and what refinement did to it."""


class BlockDriver:
    """Drives a :class:`LayerCompressor` over a stack of blocks (see the module docstring).

    Parameters
    ----------
    compressor : LayerCompressor
    stack : BlockStack
        The blocks of the dense model.
    targets : list of (name, module)
        Target layers of the dense model, all inside the blocks.
    batches : list
        Calibration batches (this rank's share with several processes).
    forward : callable, optional
        ``forward(module, batch)``.
    home : BlockHome, optional
        Where the blocks live and the device they visit (default: in memory, where they are).
    group : Group
        The processes that compress together (:mod:`svdkit.distributed`).
    progress : bool or callable
    """

    def __init__(self, compressor: LayerCompressor, stack: BlockStack, targets: Targets, batches: list[Any], *,
                 forward: Callable[[nn.Module, Any], Any] | None = None, home: BlockHome | None = None,
                 group: Group = Group(), progress: ProgressLike = None) -> None:
        self.compressor, self.config = compressor, compressor.config
        self.stack, self.targets, self.batches, self.forward = stack, targets, batches, forward
        self.home = home or BlockHome()
        self.group, self.progress = group, progress
        self.by_block = _block_targets(stack, targets)
        self.owners = layer_owners(targets, group, compressor.experts.groups if compressor.config.expert_basis == "shared" else None)
        check_patterns(self.config.rank_pattern, [name for name, _ in targets], field="rank_pattern")

    # -- pass 1 ------------------------------------------------------------------------------

    def measure(self, model: nn.Module, spill: Spill | None = None) -> DenseMeasurements | None:
        """Pass 1 on the dense ``model``, when the method needs output gradients or the config a
        global budget; None otherwise. The curvature comes from the first ``gradient_batches``
        batches of the whole calibration list, whatever the number of processes (each rank
        takes its share of those).

        Parameters
        ----------
        model : nn.Module
            The dense model whose blocks are ``stack``.
        spill : Spill, optional
            Where to keep the gradient statistics (default: a temporary directory).
        """
        gradients = self.compressor.needs_gradients
        if not gradients and self.config.budget is None:
            return None
        start = time.perf_counter()
        count = self.config.gradient_batches
        batches = self.batches[: shard_count(count, self.group, what="gradient_batches")] if count else self.batches
        spill = spill or Spill()
        flags = _frozen(model)
        try:
            spectra = self._curvature_pass(model, batches, spill, gradients)
        except BaseException:
            spill.close()
            raise
        finally:
            _restore(flags)
        if not gradients:
            spill.close()
        return DenseMeasurements(spectra, spill if gradients else None, time.perf_counter() - start, len(batches))

    def _curvature_pass(self, model: nn.Module, batches: list[Any], spill: Spill, gradients: bool) -> dict[str, LayerSpectrum]:
        group, home, stack = self.group, self.home, self.stack
        with group.checked():
            inputs = capture_block_inputs(model, stack, batches, self.forward, device=home.device, first=group.rank, step=group.world)
            hidden = [item.hidden for item in inputs]
            first = min(self.by_block) if self.by_block else len(stack.blocks)  # blocks before the first target need no gradients
            with torch.no_grad():
                for index in track(range(len(stack.blocks)), self.progress, desc="curvature: forward"):
                    if index >= first:
                        spill.put(f"boundary-{index}", hidden)
                    with home.visit(stack, index) as block:
                        hidden = [run_block(block, item, h) for item, h in zip(inputs, hidden)]
            grads: list[torch.Tensor] | None = None
            if gradients:
                grads = [head_loss_gradient(model, stack, batch, h, self._objective(item.index), self.forward)
                         for batch, item, h in zip(batches, inputs, hidden)]
            del hidden
        spectra: dict[str, LayerSpectrum] = {}
        for index in track(list(reversed(range(first, len(stack.blocks)))), self.progress, desc="curvature: backward"):
            targets = self.by_block.get(index, [])
            mine: dict[str, LayerSpectrum] = {}
            with home.visit(stack, index) as block:
                with group.checked():
                    boundary = spill.get(f"boundary-{index}")
                    spill.drop(f"boundary-{index}")
                    recording, grads = self._sweep(block, targets, inputs, boundary, grads, index)
                self._sum(recording, targets)
                with group.checked():
                    stats = self.compressor.experts.pooled(recording.statistics())
                    for name, module in targets:
                        if self.owners[name] == group.rank:
                            mine[name] = self.compressor.spectrum(name, module, stats[name])
                    owned = {name: stats[name].gradients for name in recording.gradients if self.owners[name] == group.rank}
                    if owned:
                        spill.put_statistics(f"gradients-{index}", owned)
            for part in group.gather_objects(mine):
                spectra.update(part)
        return spectra

    def _objective(self, index: int) -> Callable[[Any, Any], Any]:
        """The curvature's objective on calibration batch ``index``: its random draws (sampled
        tokens, probes) are seeded by the batch's place in the whole list, so that any split of
        the batches over torchrun ranks draws what one process draws."""
        generator = self.compressor.generator(index)
        return lambda result, batch: self.compressor.objectives(result, batch, generator)

    def _sum(self, recording: Recording, targets: Targets) -> None:
        """A block's statistics (and its MoE blocks' token counts) summed over the ranks, in place."""
        self.group.sum_statistics([recording.inputs[n] for n, _ in targets]
                                  + [recording.gradients[n] for n, _ in targets if n in recording.gradients])
        tokens = self.compressor.experts.tokens
        counted = sorted(c for c in recording.counted)
        for container, total in zip(counted, self.group.sum_ints([tokens[c] for c in counted])):
            tokens[container] = total

    def _sweep(self, block: nn.Module, targets: Targets, inputs: list[BlockInput], boundary: list[torch.Tensor],
               grads: list[torch.Tensor] | None, index: int, outputs: list[torch.Tensor] | None = None
               ) -> tuple[Recording, list[torch.Tensor] | None]:
        """Run block ``index`` on its inputs with the recorders on its targets; with ``grads`` (the
        gradients at the block's output), also push them back to the block's input and return those;
        without, the block's outputs are appended to ``outputs`` when it is given."""
        new_grads: list[torch.Tensor] = []
        prefix = f"{self.stack.block_name(index)}."
        with self.compressor.recording(targets, gradients=grads is not None) as recording, \
                self.compressor.experts.counting(block, prefix) as counted:
            recording.counted = counted
            for index, (item, h) in enumerate(zip(inputs, boundary)):
                recording.next_batch(item.index)
                if grads is None:
                    with torch.no_grad():
                        y = run_block(block, item, h)
                    if outputs is not None:
                        outputs.append(y)
                    continue
                with torch.enable_grad():
                    x = h.detach().requires_grad_(True)
                    y = run_block(block, item, x)
                    (gx,) = torch.autograd.grad(y, x, grad_outputs=grads[index].to(y.device, y.dtype))
                new_grads.append(gx.detach())
        recording.check_reached()
        return recording, new_grads if grads is not None else None

    # -- pass 2 ------------------------------------------------------------------------------

    def compress(self, model: nn.Module, out: nn.Module, measured: DenseMeasurements | None,
                 resume: Resume | None = None) -> tuple[list[LayerReport], BlockRun]:
        """Pass 2: compress ``out`` (a copy of ``model``, or ``model`` itself) block by block, in place.

        Parameters
        ----------
        model : nn.Module
            The dense model (its parameter count scopes a ``budget_scope="model"`` budget).
        out : nn.Module
            Where the factorized layers go (same module names as ``model``).
        measured : DenseMeasurements or None
            Pass 1: spectra for a budget, gradient statistics for methods that need them.
        resume : Resume, optional
            Start at a later block and hear about each block done (the directory writer).

        Returns
        -------
        rows : list of LayerReport
            In the order of the targets.
        run : BlockRun
        """
        run = BlockRun(blocks=len(self.stack.blocks))
        ranks = None
        if measured is not None:
            run.seconds["curvature"] = measured.seconds
            run.gradient_batches = measured.gradient_batches
            if self.config.budget is not None:
                candidates = [measured.spectra[name] for name, _ in self.targets]
                others = sum(p.numel() for p in model.parameters()) - sum(c.dense_params for c in candidates)
                ranks = dict(zip([c.name for c in candidates], self.compressor.choose_ranks(candidates, other_params=others, check=False)))
        out_stack = BlockStack(self.stack.name, out.get_submodule(self.stack.name))
        out_by_block = {i: [(name, out.get_submodule(name)) for name, _ in layers] for i, layers in self.by_block.items()}
        flags = _frozen(model)
        try:
            start = time.perf_counter()
            rows = self._compression_pass(out, out_stack, out_by_block, ranks, measured.spill if measured is not None else None, resume,
                                          run.refinement)
            run.seconds["compression"] = time.perf_counter() - start
        finally:
            _restore(flags)
        order = {name: i for i, (name, _) in enumerate(self.targets)}
        rows.sort(key=lambda row: order[row.name])
        return rows, run

    def _compression_pass(self, out: nn.Module, stack: BlockStack, by_block: dict[int, Targets],
                          ranks: dict[str, int | None] | None, spill: Spill | None, resume: Resume | None,
                          refinements: list[BlockRefinement]) -> list[LayerReport]:
        group, home, config = self.group, self.home, self.config
        with group.checked():
            if resume is not None and resume.inputs is not None:
                inputs = resume.inputs
            else:
                inputs = capture_block_inputs(out, stack, self.batches, self.forward, device=home.device, first=group.rank, step=group.world)
        refine = config.refine_epochs > 0
        # the dense model's inputs to each block, beside the compressed model's (refinement toward the dense outputs)
        dense = None
        if refine and config.refine_target == "dense":
            if resume is not None and resume.start > 0:
                if resume.dense is None:
                    raise ValueError(f"cannot resume at block {resume.start} with block refinement toward the dense model's outputs: "
                                     "the unfinished run kept no dense inputs to that block; start again with --overwrite")
                dense = resume.dense
            else:
                dense = [item.hidden for item in inputs]
        rows: list[LayerReport] = list(resume.rows) if resume is not None else []
        start = resume.start if resume is not None else 0
        last = max(by_block) if by_block else -1  # blocks after the last target need not run
        for index in track(range(start, last + 1), self.progress, desc="blocks compressed"):
            targets = by_block.get(index, [])
            with home.visit(stack, index) as block:
                block_rows = []
                if dense is not None:  # the block is still dense here
                    with torch.no_grad():
                        dense = [run_block(block, item, h) for item, h in zip(inputs, dense)]
                if targets:
                    shifted: list[torch.Tensor] | None = [] if refine and dense is None else None
                    with group.checked():
                        recording, _ = self._sweep(block, targets, inputs, [item.hidden for item in inputs], None, index, shifted)
                    self._sum(recording, targets)
                    with group.checked():
                        built = self._factorize_owned(targets, recording, index, ranks, spill)
                    built = self._share_layers(built, targets)
                    with group.checked():
                        for name, module in targets:
                            row, layer = built[name]
                            if layer is not None:
                                replace_module(out, name, layer)
                            block_rows.append(row)
                    del recording, built
                    if refine:  # the refined block's outputs become the next block's inputs
                        refinements.append(refine_block(
                            block, index, lambda i: run_block(block, inputs[i]), dense if dense is not None else shifted,
                            epochs=config.refine_epochs, lr=config.refine_lr, held_out=config.refine_held_out, seed=config.seed,
                            batches=[item.index for item in inputs], group=group,
                            keep_output=lambda i, y: setattr(inputs[i], "hidden", y)))
                    del shifted
                if not (refine and targets):
                    with group.checked(), torch.no_grad():
                        for item in inputs:
                            item.hidden = run_block(block, item)
                rows.extend(block_rows)
                if resume is not None:
                    with group.checked():
                        resume.block_done(index, block, inputs, block_rows, dense=dense,
                                          refinement=refinements[-1] if refine and targets else None)
        return rows

    def _factorize_owned(self, targets: Targets, recording: Recording, index: int, ranks: dict[str, int | None] | None,
                         spill: Spill | None) -> dict[str, tuple[LayerReport, nn.Module | None]]:
        """This rank's layers of a block, factorized: name -> (report row, low-rank layer or None)."""
        owned = [(name, module) for name, module in targets if self.owners[name] == self.group.rank]
        if not owned:
            return {}
        key = f"gradients-{index}"
        gradient_stats = spill.get(key) if spill is not None and (spill.path / f"{key}.pt").exists() else {}
        # the block's input statistics (experts pooled with their siblings); gradients were pooled in pass 1
        stats = self.compressor.experts.pooled({name: LayerStats(recording.inputs[name]) for name, _ in targets}, gradients=False)
        plans = [self.compressor.plan(name, module, LayerStats(stats[name].inputs, gradient_stats.get(name), stats[name].share, stats[name].tokens))
                 for name, module in owned]
        chosen = [ranks[plan.name] if ranks is not None else self.compressor.choose_ranks([plan], check=False)[0] for plan in plans]
        return {plan.name: pair for plan, pair in zip(plans, self.compressor.build(plans, chosen))}

    def _share_layers(self, built: dict[str, tuple[LayerReport, nn.Module | None]], targets: Targets
                      ) -> dict[str, tuple[LayerReport, nn.Module | None]]:
        """Every rank's factorized layers on every rank (the owners send report rows, specs and factors)."""
        group = self.group
        if not group.active:
            return built
        mine = {name: (row, None if layer is None else (layer.spec(), {k: v.cpu() for k, v in layer.state_dict().items()}))
                for name, (row, layer) in built.items()}
        shared: dict[str, tuple[LayerReport, nn.Module | None]] = {}
        modules = dict(targets)
        for r in sorted(set(self.owners[name] for name, _ in targets)):
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


def _block_targets(stack: BlockStack, targets: Targets) -> dict[int, Targets]:
    by_block: dict[int, Targets] = {}
    for name, module in targets:
        index = stack.index_of(name)
        if index is None:
            raise ValueError(f"target {name} is not inside the blocks {stack.name!r}")
        by_block.setdefault(index, []).append((name, module))
    return by_block


def layer_owners(targets: Targets, group: Group, together: dict[str, tuple] | None = None) -> dict[str, int]:
    """The rank that factorizes each target: costs ``m * n * min(m, n)`` shared evenly; targets
    with the same key in ``together`` (a mixture's experts that may share a basis) go to one rank."""
    units: dict[object, list[str]] = {}
    for name, _ in targets:
        key = together[name][:2] if together and name in together else name
        units.setdefault(key, []).append(name)
    shapes = {name: tuple(weight_matrix(module).shape) for name, module in targets}
    costs = [sum(shapes[n][0] * shapes[n][1] * min(shapes[n]) for n in names) for names in units.values()]
    owners = {}
    for names, owner in zip(units.values(), group.owners(costs)):
        owners.update(dict.fromkeys(names, owner))
    return owners


def _frozen(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Freeze every parameter (no weight gradients are needed); returns the flags to restore."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    return flags


def _restore(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)
