"""Compress a decoder LLM block by block straight into a directory: resumable, and from disk.

:func:`compress_to_directory` runs the block pipeline (:mod:`svdkit.compression.sequential`)
and writes each compressed block to its own shard as soon as it is done. The source is a model
in memory, or a transformers checkpoint directory (safetensors, sharded with
``model.safetensors.index.json`` or not) that is never loaded whole: the model is built on empty
parameters, the embeddings and head are read once, and each block is read from the shards when
it is processed and given back afterwards, so host memory holds one block (plus the cached
activations and one block's statistics) however many blocks there are.

While it runs, the directory holds a consistent partial result: the shards of the blocks done,
``svdkit_progress.json`` (the config, the source, a digest of the calibration data, the ranks,
the blocks done) and ``.svdkit-work/`` (the curvature pass's statistics and the compressed
model's inputs to the next block). A block's shard, then the inputs, then the progress file are
each written to a temporary name and renamed, so a crash at any moment leaves the last complete
block. ``resume=True`` continues from the first unfinished block and gives what an uninterrupted
run gives. The finished directory is sharded safetensors with an index, the description, the
transformers config and the tokenizer, which :func:`svdkit.load_compressed` loads on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .. import __version__
from ..checkpoint import Checkpoint
from ..distributed import Group, current_group, shard
from ..layers.lowrank import LowRankLayer
from ..progress import ProgressLike
from ..surgery import find_targets
from .blocks import BlockHome, BlockInput, BlockStack, find_blocks
from .config import CompressConfig
from .io import CONFIG_NAME, FORMAT_VERSION, INDEX_NAME, PROGRESS_NAME, sha256
from .pipeline import _check_token_batches, _check_weights, _curvature
from .report import CompressionReport, LayerReport, peak_memory
from .sequential import Curvature, Resume, compress_blocks, measure_curvature
from .spill import Spill
from .transformers_files import transformers_skeleton, write_companions

__all__ = ["compress_to_directory"]

WORK_NAME = ".svdkit-work"
REST_NAME = "model-rest.safetensors"


def _block_file(index: int) -> str:
    return f"model-block-{index:05d}.safetensors"


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    unique: dict[int, str] = {}
    kept = {}
    for key, tensor in tensors.items():  # a tied tensor is saved once, under its first name
        ident = id(tensor)
        if ident not in unique:
            unique[ident] = key
            kept[key] = tensor.detach().to("cpu").contiguous()
    _write_atomic(path, lambda t: save_file(kept, str(t), metadata={"format": "pt"}))


def _digest(batches: list[Any]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        tensors = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                digest.update(str(tuple(t.shape)).encode())
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            else:
                digest.update(repr(t).encode())
    return digest.hexdigest()


class _Progress(Resume):
    """The resumable writer: each block done goes to its shard, the next inputs and the progress file."""

    def __init__(self, directory: Path, state: dict[str, Any], start: int, inputs: list[BlockInput] | None,
                 rows: list[LayerReport], stack: BlockStack, group: Group) -> None:
        super().__init__(start, inputs, rows)
        self.directory, self.state, self.stack, self.lead = directory, state, stack, group.rank == 0
        self.inputs_path = directory / WORK_NAME / f"inputs-rank-{group.rank}.pt"

    def block_done(self, index: int, block: nn.Module, inputs: list[BlockInput], rows: list[LayerReport]) -> None:
        # Every rank keeps its share of the next block's inputs; rank 0 writes the block and the progress.
        _write_atomic(self.inputs_path, lambda t: torch.save({"blocks_done": index + 1, "inputs": inputs}, t))
        if not self.lead:
            return
        prefix = f"{self.stack.block_name(index)}."
        _save_tensors(self.directory / _block_file(index), {prefix + k: v for k, v in block.state_dict(keep_vars=True).items()})
        specs = {f"{prefix}{name}": module.spec() for name, module in block.named_modules() if isinstance(module, LowRankLayer)}
        self.state["layers"].update(specs)
        self.state["rows"].extend(_row_dict(row) for row in rows)
        self.state["blocks_done"] = index + 1
        self.save()

    def save(self) -> None:
        _write_atomic(self.directory / PROGRESS_NAME, lambda t: t.write_text(json.dumps(self.state, indent=2)))


def _row_dict(row: LayerReport) -> dict[str, Any]:
    out = dict(row.__dict__)
    out["shape"] = list(row.shape)
    return out


def _row(data: dict[str, Any]) -> LayerReport:
    return LayerReport(**dict(data, shape=tuple(data["shape"])))


def _open_source(source: nn.Module | str | os.PathLike) -> tuple[nn.Module, Checkpoint | None, str | None]:
    """(model, checkpoint or None, source spec): a checkpoint directory becomes an empty model."""
    if isinstance(source, nn.Module):
        return source, None, None
    directory = Path(source)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a transformers checkpoint directory (no config.json)")
    checkpoint = Checkpoint(directory)
    try:
        model = transformers_skeleton(directory)
        checkpoint.check_fits(model)  # a missing or misshapen tensor is refused now, not when its block is reached
    except BaseException:
        checkpoint.close()
        raise
    return model, checkpoint, str(directory.resolve())


def _load_outside(model: nn.Module, stack: BlockStack, checkpoint: Checkpoint) -> None:
    """Read every empty parameter outside the blocks (embeddings, final norm, head) once."""
    prefix = f"{stack.name}."
    for name, param in list(model.named_parameters()):
        if param.is_meta and not name.startswith(prefix):
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._parameters[attr] = nn.Parameter(checkpoint.tensor(name, shape=param.shape), requires_grad=False)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def _start_state(directory: Path, config: CompressConfig, digest: str, source_spec: str | None, resume: bool, overwrite: bool,
                 world: int) -> dict[str, Any] | None:
    """The progress of an unfinished run to resume, or None to start; refuses what it must not touch."""
    if not directory.exists():
        if resume:
            raise FileNotFoundError(f"nothing to resume at {directory}")
        return None
    progress = directory / PROGRESS_NAME
    if progress.exists():
        state = json.loads(progress.read_text())
        if overwrite:
            shutil.rmtree(directory)
            return None
        if not resume:
            raise FileExistsError(
                f"{directory} holds an unfinished compression ({state.get('blocks_done', 0)} blocks done): "
                "pass resume=True (--resume) to continue it, or overwrite=True (--overwrite) to start again"
            )
        for key, value in (("config", config.to_dict()), ("calibration", digest), ("source", source_spec), ("world", world)):
            if state.get(key) != value:
                raise ValueError(f"cannot resume {directory}: its {key} differs from this run's; start again with --overwrite")
        return state
    if (directory / CONFIG_NAME).exists() and overwrite:
        shutil.rmtree(directory)
        return None
    if resume and (directory / CONFIG_NAME).exists():
        raise FileExistsError(f"{directory} holds a finished compression: there is nothing to resume")
    raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace an svdkit output")


def compress_to_directory(
    source: nn.Module | str | os.PathLike,
    directory: str | os.PathLike,
    config: CompressConfig | None = None,
    calibration: Iterable[Any] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    tokenizer: Any = None,
    source_spec: str | None = None,
    progress: ProgressLike = False,
) -> CompressionReport:
    """Compress a decoder model block by block into ``directory`` (see the module docstring).

    Parameters
    ----------
    source : nn.Module or path
        A model in memory (compressed in place), or a transformers checkpoint directory read
        from disk one block at a time.
    directory : path
        The output; an unfinished one is continued with ``resume``.
    config : CompressConfig, optional
        The block pipeline's config (its ``pipeline`` must not be ``"model"``).
    calibration : iterable of batches
        Token-id batches (the same on every rank under torchrun; each rank takes its share).
    resume : bool
        Continue an unfinished run in ``directory`` (same config, source and calibration).
    overwrite : bool
        Replace an svdkit output (finished or not) in ``directory``.
    forward : callable, optional
        ``forward(module, batch)``.
    tokenizer : optional
        Saved with the model.
    source_spec : str, optional
        The spec to record (a checkpoint directory records its own path).
    progress : bool or callable

    Returns
    -------
    CompressionReport
        With ``pipeline="blocks"``; ``peak_memory`` is the process's peak resident memory.

    Raises
    ------
    FileExistsError
        ``directory`` exists (or is unfinished) and neither ``resume`` nor ``overwrite`` says what
        to do with it.
    ValueError
        The model is not a stack of blocks, the config asks for the whole-model pipeline, a
        resumed run differs from the first, or what :func:`svdkit.compress` refuses.
    """
    config = config or CompressConfig()
    if config.pipeline == "model" or config.refit or config.heal_steps:
        raise ValueError("compress_to_directory runs the block pipeline: pipeline='model', refit and heal_steps are not available")
    start_time = time.perf_counter()
    directory = Path(directory)
    group = current_group()
    model, checkpoint, spec = _open_source(source)
    spec = source_spec or spec
    try:
        targets = find_targets(model, config.target_modules, exclude=config.exclude, kinds=config.kinds,
                               include_embeddings=config.include_embeddings, include_head=config.include_head)
        if not targets:
            raise ValueError(f"no supported layer matched target_modules={config.target_modules!r}, exclude={config.exclude!r}")
        params = sum(p.numel() for p in model.parameters())  # shapes are known even for empty parameters
        stack = find_blocks(model, [name for name, _ in targets])
        if stack is None:
            raise ValueError("compress_to_directory needs every target inside one stack of identical blocks (an nn.ModuleList)")
        if checkpoint is None:
            _check_weights(targets)
        else:
            _load_outside(model, stack, checkpoint)
        if calibration is None:
            raise ValueError("the block pipeline needs calibration data (token-id batches)")
        calibration = list(calibration)
        _check_token_batches(model, calibration)
        digest = _digest(calibration)
        state = None
        with group.checked():
            if group.rank == 0:
                state = _start_state(directory, config, digest, spec, resume, overwrite, group.world)
                (directory / WORK_NAME).mkdir(parents=True, exist_ok=True)
        state = group.broadcast_objects([state], owner=0)[0]
        if group.active:
            calibration = shard(calibration, group)
        device = config.device or (group.device if group.device.type == "cuda" else None)
        home = BlockHome(device, checkpoint)
        work = directory / WORK_NAME
        spill = Spill(work / f"rank-{group.rank}")
        needs_pass1 = config.method == "fisher" or config.budget is not None
        if state is None:
            measured = measure_curvature(model, stack, targets, calibration, config, forward=forward, curvature=_curvature(config, model),
                                         home=home, progress=progress, group=group, spill=spill)
            state = {"format": 1, "svdkit_version": __version__, "config": config.to_dict(), "calibration": digest,
                     "source": spec, "world": group.world, "curvature_seconds": measured.seconds if measured else 0.0,
                     "blocks_done": 0, "layers": {}, "rows": []}
            writer = _Progress(directory, state, 0, None, [], stack, group)
            with group.checked():
                if group.rank == 0:
                    if measured is not None:
                        torch.save(measured.spectra, work / "spectra.pt")
                    writer.save()
        else:
            measured = None
            if needs_pass1:
                measured = Curvature(torch.load(work / "spectra.pt", weights_only=False), spill if config.method == "fisher" else None,
                                     state["curvature_seconds"], 0)
            writer = _Progress(directory, state, state["blocks_done"], None, [_row(r) for r in state["rows"]], stack, group)
            if state["blocks_done"]:
                kept = torch.load(writer.inputs_path, map_location="cpu", weights_only=False)
                if kept["blocks_done"] != state["blocks_done"]:  # the crash came between a block's inputs and its progress
                    raise ValueError(f"cannot resume {directory}: its kept inputs are of block {kept['blocks_done']}, its progress "
                                     f"of block {state['blocks_done']}; start again with --overwrite")
                writer.inputs = kept["inputs"]
        rows, run = compress_blocks(model, model, stack, targets, calibration, config, forward=forward, measured=measured,
                                    home=home, progress=progress, group=group, resume=writer)
        report = CompressionReport(method=config.method, layers=rows, pipeline="blocks", model_params_before=params)
        report.model_params_after = params - report.target_params_before + report.target_params_after
        report.timings.update(run.seconds)
        report.timings["curvature"] = state.get("curvature_seconds", 0.0)
        with group.checked():
            if group.rank == 0:
                _finish(model, stack, directory, state, config, spec, tokenizer, report, checkpoint, home)
        report.seconds = time.perf_counter() - start_time
        report.peak_memory = peak_memory()
        return report
    finally:
        if checkpoint is not None:
            checkpoint.close()


def _finish(model: nn.Module, stack: BlockStack, directory: Path, state: dict[str, Any], config: CompressConfig,
            spec: str | None, tokenizer: Any, report: CompressionReport, checkpoint: Checkpoint | None, home: BlockHome) -> None:
    """Write what is not a compressed block, the index, the description; remove the progress."""
    done = state["blocks_done"]
    for index in range(done, len(stack.blocks)):  # blocks after the last target, copied as they are
        with home.visit(stack, index) as block:
            prefix = f"{stack.block_name(index)}."
            _save_tensors(directory / _block_file(index), {prefix + k: v for k, v in block.state_dict(keep_vars=True).items()})
    prefix = f"{stack.name}."
    rest = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(prefix)}
    _save_tensors(directory / REST_NAME, rest)
    files = [_block_file(i) for i in range(len(stack.blocks))] + [REST_NAME]
    weight_map: dict[str, str] = {}
    for name in files:
        with Checkpoint(directory / name) as part:
            weight_map.update({key: name for key in part.keys()})
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    write_companions(model, directory, tokenizer)
    meta = {
        "format_version": FORMAT_VERSION, "svdkit_version": __version__, "source": spec, "config": config.to_dict(),
        "report": report.totals(), "layers": state["layers"], "files": {name: sha256(directory / name) for name in files},
    }
    _write_atomic(directory / CONFIG_NAME, lambda t: t.write_text(json.dumps(meta, indent=2)))
    (directory / PROGRESS_NAME).unlink()
    shutil.rmtree(directory / WORK_NAME, ignore_errors=True)
