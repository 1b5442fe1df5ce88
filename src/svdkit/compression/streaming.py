"""Compress a decoder LLM block by block straight into a directory: resumable, and from disk.

:func:`compress_to_directory` runs the block pipeline (:mod:`svdkit.compression.block_driver`)
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

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .. import __version__
from ..checkpoint import Checkpoint, materialize
from ..distributed import Group, current_group, shard
from ..export.dtype import dtype_name, parse_dtype, weights_dtype
from ..files import save_tensors, write_atomic
from ..layers.lowrank import LowRankLayer
from ..progress import ProgressLike
from .block_driver import BlockDriver, DenseMeasurements, Resume
from .blocks import BlockHome, BlockInput, BlockStack, find_blocks
from ..experts import fold_dense_banks, unfold_experts
from .checks import calibration_digest, check_same_calibration, check_token_batches, check_weights, reaches_experts, select_targets
from .compressor import LayerCompressor
from .refine import BlockRefinement
from .config import CompressConfig
from .io import CONFIG_NAME, INDEX_NAME, PROGRESS_NAME
from .report import CompressionReport, LayerReport, peak_memory
from .saved import sha256, write_saved_files
from .spill import Spill
from .transformers_files import transformers_skeleton

__all__ = ["compress_to_directory"]

logger = logging.getLogger(__name__)

WORK_NAME = ".svdkit-work"
REST_NAME = "model-rest.safetensors"


def _block_file(index: int) -> str:
    return f"model-block-{index:05d}.safetensors"


class _Progress(Resume):
    """The resumable writer: each block done goes to its shard, the next inputs and the progress file."""

    def __init__(self, directory: Path, state: dict[str, Any], start: int, inputs: list[BlockInput] | None,
                 rows: list[LayerReport], stack: BlockStack, group: Group) -> None:
        super().__init__(start, inputs, rows)
        self.directory, self.state, self.stack, self.lead = directory, state, stack, group.rank == 0
        self.inputs_path = directory / WORK_NAME / f"inputs-rank-{group.rank}.pt"

    def block_done(self, index: int, block: nn.Module, inputs: list[BlockInput], rows: list[LayerReport], *,
                   dense: list[torch.Tensor] | None, refinement: BlockRefinement | None) -> None:
        # Every rank keeps its share of the next block's inputs (the compressed model's, and the dense
        # model's when block refinement needs them); rank 0 writes the block and the progress.
        write_atomic(self.inputs_path, lambda t: torch.save({"blocks_done": index + 1, "inputs": inputs, "dense": dense}, t))
        if refinement is not None:  # the same on every rank
            self.state.setdefault("refinement", []).append(refinement.to_dict())
        if not self.lead:
            return
        prefix = f"{self.stack.block_name(index)}."
        fold_dense_banks(block)
        save_tensors(self.directory / _block_file(index), {prefix + k: v for k, v in block.state_dict(keep_vars=True).items()},
                     dtype=parse_dtype(self.state.get("dtype")))
        specs = {f"{prefix}{name}": module.spec() for name, module in block.named_modules() if isinstance(module, LowRankLayer)}
        self.state["layers"].update(specs)
        self.state["rows"].extend(_row_dict(row) for row in rows)
        self.state.setdefault("shards", {})[_block_file(index)] = sha256(self.directory / _block_file(index))
        self.state["blocks_done"] = index + 1
        self.save()

    def save(self) -> None:
        write_atomic(self.directory / PROGRESS_NAME, lambda t: t.write_text(json.dumps(self.state, indent=2)))


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


def _normal_spec(spec: str) -> str:
    """A spec that names a path, absolute (a run resumed from another directory names the same source)."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def _start_state(directory: Path, run: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The progress of an unfinished run to resume, or None to start; refuses what it must not touch.

    ``run`` holds this run's ``config``, ``calibration``, ``calibration_shapes``, ``source``,
    ``world`` and ``dtype``, compared with the unfinished run's before anything is computed.
    """
    if not directory.exists():
        if resume:
            raise FileNotFoundError(f"nothing to resume at {directory}")
        return None
    progress = directory / PROGRESS_NAME
    if progress.exists():
        if overwrite:
            shutil.rmtree(directory)
            return None
        state = _read_progress(progress)
        if not resume:
            raise FileExistsError(
                f"{directory} holds an unfinished compression ({state.get('blocks_done', 0)} blocks done): "
                "pass resume=True (--resume) to continue it, or overwrite=True (--overwrite) to start again"
            )
        _check_resumable(directory, state, run)
        return state
    if (directory / CONFIG_NAME).exists():
        if overwrite:
            shutil.rmtree(directory)
            return None
        if resume:
            raise FileExistsError(f"{directory} holds a finished compression: there is nothing to resume")
    elif {p.name for p in directory.iterdir()} <= {WORK_NAME}:
        # A run that stopped before its first block (in the curvature pass) kept nothing to continue.
        if resume or overwrite:
            if resume:
                logger.warning("%s holds a compression that stopped before its first block: starting it again", directory)
            shutil.rmtree(directory)
            return None
        raise FileExistsError(
            f"{directory} holds a compression that stopped before its first block (only {WORK_NAME}/): "
            "pass resume=True (--resume) or overwrite=True (--overwrite) to start it again"
        )
    raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace an svdkit output")


def _read_progress(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}; the progress file is damaged: start again with --overwrite") from None
    if not isinstance(state, dict) or not isinstance(state.get("blocks_done"), int):
        raise ValueError(f"{path} is not an svdkit progress file (no 'blocks_done'): start again with --overwrite")
    return state


def _check_resumable(directory: Path, state: dict[str, Any], run: dict[str, Any]) -> None:
    """Refuse to resume a run that differs from this one (naming what differs and both values),
    or whose kept files are missing or changed, before any work."""
    hint = "resume with the same options, or start again with --overwrite"
    saved, now = state.get("config", {}), run["config"]
    fields = [f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if fields:
        raise ValueError(f"cannot resume {directory}: its config differs from this run's ({'; '.join(fields)}); {hint}")
    if state.get("calibration") != run["calibration"]:
        raise ValueError(
            f"cannot resume {directory}: its calibration differs from this run's ({state.get('calibration_shapes', 'unknown')} then, "
            f"{run['calibration_shapes']} now; or the same shapes with other tokens: --calib, --calib-seqs, --seq-len, "
            f"--batch-size and --calib-seed must be as before); {hint}"
        )
    if state.get("source") != run["source"]:
        raise ValueError(f"cannot resume {directory}: it compresses {state.get('source')!r}, this run {run['source']!r}; {hint}")
    if state.get("world") != run["world"]:
        raise ValueError(
            f"cannot resume {directory}: it ran with {state.get('world')} process(es), this run has {run['world']}; resume it "
            f"with {state.get('world')} (torchrun --nproc_per_node={state.get('world')}), or start again with --overwrite"
        )
    if state.get("dtype") != run["dtype"]:
        saved_in = lambda d: d or "the model's own dtype"  # noqa: E731
        raise ValueError(f"cannot resume {directory}: it saves its weights in {saved_in(state.get('dtype'))}, this run in "
                         f"{saved_in(run['dtype'])}; {hint}")
    work = directory / WORK_NAME
    if not work.is_dir():
        raise FileNotFoundError(f"cannot resume {directory}: its work directory {work} is missing; start again with --overwrite")
    for name, digest in state.get("shards", {}).items():
        path = directory / name
        if not path.is_file() or sha256(path) != digest:
            why = "is missing" if not path.is_file() else "does not match the SHA-256 recorded when it was written (damaged or changed)"
            raise ValueError(f"cannot resume {directory}: its finished shard {name} {why}; start again with --overwrite")


def _calibration_shapes(batches: list[Any]) -> str:
    """The calibration's batches in words, e.g. ``"32 batches of (4, 256)"``."""
    shapes = [tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__ for b in batches]
    distinct = list(dict.fromkeys(shapes))
    return f"{len(batches)} batches of " + ", ".join(map(str, distinct[:3])) + (" ..." if len(distinct) > 3 else "")


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
    dtype: str | torch.dtype | None = None,
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
    dtype : {"float32", "bfloat16", "float16", "float64"} or torch.dtype, optional
        Cast the saved floating-point weights (as :func:`svdkit.save_compressed` does); default:
        the model's own dtype. A resumed run must ask for the same.

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
    if config.pipeline == "model" or config.refit or config.layerwise_distill_steps:
        raise ValueError("compress_to_directory runs the block pipeline: pipeline='model', refit and layerwise_distill_steps are not available")
    if calibration is None:
        raise ValueError("the block pipeline needs calibration data (token-id batches)")
    start_time = time.perf_counter()
    cast = parse_dtype(dtype)
    directory = Path(directory)
    group = current_group()
    model, checkpoint, spec = _open_source(source)
    spec = _normal_spec(source_spec) if source_spec is not None else spec
    try:
        # a mixture's fused experts are unfolded (one module per expert) for good: each block is
        # written with the banks of its factorized experts (dense ones folded back)
        unfold_experts(model, unfold=lambda name: reaches_experts(config, name))
        targets = select_targets(model, config)
        params = sum(p.numel() for p in model.parameters())  # shapes are known even for empty parameters
        stack = find_blocks(model, [name for name, _ in targets])
        if stack is None:
            raise ValueError("compress_to_directory needs every target inside one stack of identical blocks (an nn.ModuleList)")
        check_weights(targets)
        if checkpoint is not None:  # everything outside the blocks is read once; the blocks one at a time
            materialize(model, checkpoint, skip=f"{stack.name}.")
            _tie(model)
        calibration = list(calibration)
        check_token_batches(model, calibration)
        LayerCompressor(config, model).check_calibration(calibration)
        digest = calibration_digest(calibration)
        check_same_calibration(group, digest)
        run_info = {"config": config.to_dict(), "calibration": digest, "calibration_shapes": _calibration_shapes(calibration),
                    "source": spec, "world": group.world, "dtype": dtype_name(cast) if cast is not None else None}
        state = None
        with group.checked():
            if group.rank == 0:
                state = _start_state(directory, run_info, resume, overwrite)
                (directory / WORK_NAME).mkdir(parents=True, exist_ok=True)
        state = group.broadcast_objects([state], owner=0)[0]
        if group.active:
            calibration = shard(calibration, group)
        device = config.device or (group.device if group.device.type == "cuda" else None)
        compressor = LayerCompressor(config, model, targets)
        driver = BlockDriver(compressor, stack, targets, calibration, forward=forward, home=BlockHome(device, checkpoint),
                             group=group, progress=progress)
        spill = Spill(directory / WORK_NAME / f"rank-{group.rank}")
        if state is None:
            measured, writer = _start(driver, model, directory, run_info, spill)
        else:
            measured, writer = _reload(driver, directory, state, spill)
        rows, run = driver.compress(model, model, measured, resume=writer)
        report = CompressionReport(method=config.method, layers=rows, pipeline="blocks", model_params_before=params,
                                   refinement=list(writer.state.get("refinement", [])))
        report.model_params_after = params - report.target_params_before + report.target_params_after
        report.timings.update(run.seconds)
        report.timings["curvature"] = writer.state.get("curvature_seconds", 0.0)
        with group.checked():
            if group.rank == 0:
                _finish(model, stack, directory, writer.state, config, spec, tokenizer, report, checkpoint, driver.home)
        report.seconds = time.perf_counter() - start_time
        report.peak_memory = peak_memory()
        return report
    finally:
        if checkpoint is not None:
            checkpoint.close()


def _tie(model: nn.Module) -> None:
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def _start(driver: BlockDriver, model: nn.Module, directory: Path, run_info: dict[str, Any],
           spill: Spill) -> tuple[DenseMeasurements | None, "_Progress"]:
    """A new run: pass 1, then the first progress file (rank 0)."""
    group = driver.group
    measured = driver.measure(model, spill)
    state = {"format": 1, "svdkit_version": __version__, **run_info, "curvature_seconds": measured.seconds if measured else 0.0,
             "blocks_done": 0, "layers": {}, "rows": [], "shards": {}}
    writer = _Progress(directory, state, 0, None, [], driver.stack, group)
    with group.checked():
        if group.rank == 0:
            if measured is not None:
                torch.save(measured.spectra, directory / WORK_NAME / "spectra.pt")
            writer.save()
    return measured, writer


def _reload(driver: BlockDriver, directory: Path, state: dict[str, Any], spill: Spill) -> tuple[DenseMeasurements | None, "_Progress"]:
    """An unfinished run: pass 1's results and the inputs of the first unfinished block, from the work directory."""
    compressor = driver.compressor
    measured = None
    if compressor.needs_gradients or compressor.config.budget is not None:
        spectra = torch.load(_kept(directory / WORK_NAME / "spectra.pt"), weights_only=False)
        measured = DenseMeasurements(spectra, spill if compressor.needs_gradients else None, state["curvature_seconds"], 0)
    writer = _Progress(directory, state, state["blocks_done"], None, [_row(r) for r in state["rows"]], driver.stack, driver.group)
    if state["blocks_done"]:
        kept = torch.load(_kept(writer.inputs_path), map_location="cpu", weights_only=False)
        if kept["blocks_done"] != state["blocks_done"]:  # the crash came between a block's inputs and its progress
            raise ValueError(f"cannot resume {directory}: its kept inputs are of block {kept['blocks_done']}, its progress "
                             f"of block {state['blocks_done']}; start again with --overwrite")
        writer.inputs, writer.dense = kept["inputs"], kept.get("dense")
    return measured, writer


def _kept(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path}, which the unfinished run kept, is missing; start again with --overwrite")
    return path


def _finish(model: nn.Module, stack: BlockStack, directory: Path, state: dict[str, Any], config: CompressConfig,
            spec: str | None, tokenizer: Any, report: CompressionReport, checkpoint: Checkpoint | None, home: BlockHome) -> None:
    """Write what is not a compressed block, the index, the description; remove the progress."""
    done = state["blocks_done"]
    cast = parse_dtype(state.get("dtype"))
    for index in range(done, len(stack.blocks)):  # blocks after the last target, copied as they are
        with home.visit(stack, index) as block:
            prefix = f"{stack.block_name(index)}."
            fold_dense_banks(block)
            save_tensors(directory / _block_file(index), {prefix + k: v for k, v in block.state_dict(keep_vars=True).items()}, dtype=cast)
    prefix = f"{stack.name}."
    rest = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(prefix)}
    save_tensors(directory / REST_NAME, rest, dtype=cast)
    files = [_block_file(i) for i in range(len(stack.blocks))] + [REST_NAME]
    weight_map: dict[str, str] = {}
    for name in files:
        with Checkpoint(directory / name) as part:
            weight_map.update({key: name for key in part.keys()})
    index_text = json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
    write_atomic(directory / INDEX_NAME, lambda t: t.write_text(index_text))
    write_saved_files(model, directory, weight_files=files, layers=state["layers"], dtype=cast or weights_dtype(rest.values()),
                      source=spec, config=config, report=report, tokenizer=tokenizer)
    (directory / PROGRESS_NAME).unlink()
    shutil.rmtree(directory / WORK_NAME, ignore_errors=True)
