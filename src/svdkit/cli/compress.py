"""``svdkit compress``: compress a model, print the report, save it, and measure its quality.

What calibrates a model and what measures it depends on the model:

=========================  =========================================  ===================================
model                      calibration (``--calib builtin``)          quality (before -> after)
=========================  =========================================  ===================================
causal language model      ``--calib-seqs`` windows of ``--seq-len``  perplexity on every held-out domain
                           tokens of built-in text                    (and the worst ratio), a greedy
                                                                      continuation; ``--tasks``: accuracy
sentence-transformers      ``--calib-seqs`` built-in sentences        mean cosine and top-10 neighbours
anything else              ``--calib FILE.pt`` (a tensor of inputs)   (none)
=========================  =========================================  ===================================
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from ._common import (
    add_output_options,
    add_rank_options,
    add_target_options,
    check_outputs,
    positive_int,
    progress_option,
    rank_from_options,
    table_stream,
    target_spec,
    write_json,
)
from ._compress_checks import check_model_options, check_targets, factorized_nothing, output_directories
from ._speed import add_compress_options, check_quantize_model, check_quantize_platform, measure_speed, quantize, quantize_fields

DEFAULT_PARAMS = 0.6
DEFAULT_LM_PARAMS = 0.8
SENTENCES = 256
SENTENCE_BATCH = 32
LM_SEQS, LM_SEQ_LEN, LM_BATCH = 128, 256, 4
GRADIENT_SEQS = 64
LM_REFINE_EPOCHS = 4  # block refinement of a causal LM in the block pipeline (docs/benchmarks.md: better on every domain)
HEAL_WINDOWS = 128
PROMPT = "The for statement in Python"

def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="compress a model into low-rank factors",
        description=(
            "Compress a model's Linear/Conv1D/Conv2d layers into low-rank factors and save it. Default: the fisher "
            "method (input whitening plus the curvature of the model's objective at each layer's output) with a "
            f"global budget of {DEFAULT_LM_PARAMS:.0%} of the targeted parameters for a causal language model (its "
            f"decoder blocks, compressed block by block, each block's factors then refined for up to {LM_REFINE_EPOCHS} "
            f"epochs toward the dense block's outputs) and {DEFAULT_PARAMS:.0%} otherwise, calibrated on built-in "
            "English text."
        ),
    )
    parser.add_argument("model", help="minilm, smollm2, a .gguf file, a transformers or sentence-transformers directory, a .pt file, or package.module:factory")
    parser.add_argument("-o", "--output", required=True, help="directory to write the compressed model to")
    add_rank_options(parser, params=True)
    parser.add_argument("--uniform", action="store_true", help="with --params: the same fraction in every layer instead of a global budget")
    parser.add_argument("--method", default="fisher", help="svd, asvd, whiten or fisher (default: fisher)")
    parser.add_argument("--curvature", default="auto",
                        help="the output side of fisher and the budget: 'labels' (a language model's true next tokens: the "
                             "empirical Fisher), 'sampled' (next tokens sampled from the model: the true Fisher), 'probes' "
                             "(random output directions); 'auto' (default): labels for a language model, probes otherwise")
    parser.add_argument("--calib", default="builtin",
                        help="'builtin' (English text shipped with Python), a .txt file, or a .pt tensor (token ids for a language model, inputs otherwise)")
    parser.add_argument("--calib-seqs", type=positive_int, default=None,
                        help=f"calibration sequences: windows for a language model (default {LM_SEQS}), sentences for a sentence model (default {SENTENCES})")
    parser.add_argument("--seq-len", type=positive_int, default=None, help=f"tokens per calibration window of a language model (default {LM_SEQ_LEN}, at most its context)")
    parser.add_argument("--gradient-seqs", type=positive_int, default=None,
                        help=f"calibration windows of a language model used for the curvature (backward passes; default {GRADIENT_SEQS})")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help=f"calibration batch size (default {LM_BATCH} windows or {SENTENCE_BATCH} sentences)")
    add_target_options(parser, what="layers to compress (default: every Linear/Conv1D/Conv2d but the output head)")
    parser.add_argument("--pipeline", choices=("auto", "model", "blocks"), default="auto",
                        help="block by block (decoder LLMs; the default for them) or the whole model at once")
    parser.add_argument("--device", default=None, help="compute device of the block pipeline (e.g. cuda); the model stays where it is loaded")
    parser.add_argument("--stream", action="store_true",
                        help="read MODEL (a transformers checkpoint directory) one block at a time from disk and write each compressed block as it is done")
    parser.add_argument("--resume", action="store_true", help="continue an unfinished --stream (or language-model) run in OUTPUT")
    parser.add_argument("--refit", type=int, default=0, help="closed-form refit passes after compression (whole-model pipeline)")
    parser.add_argument("--refine-epochs", type=int, default=None,
                        help="block refinement of a causal LM: at most this many epochs per block, early-stopped on held-out "
                             f"calibration windows (default {LM_REFINE_EPOCHS} in the block pipeline with a calibrated method; "
                             "0: off, about 2.5x faster)")
    parser.add_argument("--refine-target", choices=("dense", "shifted"), default=None,
                        help="block refinement reproduces the dense block on the dense model's inputs, or on the compressed model's")
    parser.add_argument("--heal-steps", type=int, default=0,
                        help="after compressing a causal LM: distil it toward the dense model for this many steps (see svdkit heal)")
    parser.add_argument("--heal-lr", type=float, default=5e-5, help="peak learning rate of --heal-steps (default 5e-5)")
    parser.add_argument("--no-eval", action="store_true", help="skip the quality check on held-out text")
    parser.add_argument("--tasks", action="store_true",
                        help="a causal LM's quality check also scores the zero-shot tasks next-sentence and last-word (accuracy before -> after)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing svdkit output directory")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of the saved weights (default: the model's own); transformers loads the model in it")
    add_compress_options(parser)
    add_output_options(parser, json_help="also write the report as JSON to FILE ('-': standard output)")
    parser.set_defaults(run=run)


def _config(args: argparse.Namespace, loaded) -> Any:
    """The CompressConfig of the options; ``loaded`` None checks the options before the model is
    loaded (the defaults that depend on the model are left out)."""
    from ..compression import CompressConfig
    from ..linalg import ParamRatio

    exclude = target_spec(args.exclude, "--exclude") or ()
    fields: dict[str, Any] = {"method": args.method, "curvature": args.curvature, "refit": args.refit, "exclude_modules": exclude,
                              "pipeline": args.pipeline,
                              "rank_multiple": args.rank_multiple, "speed_aware": args.speed_aware, **quantize_fields(args)}
    targets = target_spec(args.targets)
    if targets is not None:
        fields["target_modules"] = targets
    elif loaded is not None and loaded.is_sentence_model:
        # A BERT pooler does not shape a sentence-transformers embedding (it pools the tokens).
        poolers = tuple(name for name, _ in loaded.module.named_modules() if ".pooler." in f".{name}." and name.endswith("dense"))
        if poolers:  # a regex --exclude gets the poolers' exact names as alternatives
            fields["exclude_modules"] = f"(?:{exclude})|" + "|".join(map(re.escape, poolers)) if isinstance(exclude, str) else exclude + poolers
    if args.device is not None:
        fields["device"] = args.device
    for option in ("refine_epochs", "refine_target"):
        if getattr(args, option) is not None:
            fields[option] = getattr(args, option)
    rank = rank_from_options(args)
    if rank is not None:
        fields["rank"] = rank
    else:
        params = args.params or ((DEFAULT_LM_PARAMS if loaded is not None and loaded.is_causal_lm else DEFAULT_PARAMS),)
        if args.uniform:
            if len(params) > 1:
                raise ValueError(f"--uniform takes one fraction, got --params {','.join(map(str, params))}")
            fields["rank"] = ParamRatio(params[0])
        else:
            fields["budget"] = params[0]
    if loaded is not None and loaded.is_causal_lm:
        batch = args.batch_size or LM_BATCH
        seqs = args.gradient_seqs or min(GRADIENT_SEQS, args.calib_seqs or LM_SEQS)
        fields["gradient_batches"] = max(1, -(-seqs // batch))
        config = CompressConfig(**fields)
        if args.refine_epochs is None and config.needs_data and _block_pipeline(config, loaded.module):
            return dataclasses.replace(config, refine_epochs=LM_REFINE_EPOCHS)
        return config
    return CompressConfig(**fields)


def _block_pipeline(config, module) -> bool:
    """Whether ``config`` compresses ``module`` block by block (where block refinement's default
    applies); False too when its targets cannot be selected (that is reported later)."""
    from ..compression.checks import select_targets
    from ..compression.pipeline import choose_pipeline

    try:
        return choose_pipeline(module, select_targets(module, config), config) is not None
    except ValueError:
        return False


def _lm_calibration(args: argparse.Namespace, loaded) -> list:
    from ..corpus import is_mix
    from ..tokens import calibration_tokens

    context = loaded.context_length or LM_SEQ_LEN
    seq_len = args.seq_len or min(LM_SEQ_LEN, context)
    if seq_len > context:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context ({context} tokens)")
    ids = calibration_tokens(
        args.calib if args.calib == "builtin" or is_mix(args.calib) else Path(args.calib), loaded.tokenizer,
        n_seqs=args.calib_seqs or LM_SEQS, seq_len=seq_len, seed=args.calib_seed, vocab_size=loaded.vocab_size,
    )
    return list(ids.split(args.batch_size or LM_BATCH))


def _calibration(args: argparse.Namespace, loaded) -> list:
    from ..data import calibration_sentences
    from ..tensor_file import read_tensor_file

    size = args.calib_seqs or SENTENCES
    batch = args.batch_size or SENTENCE_BATCH
    if loaded.is_causal_lm:
        return _lm_calibration(args, loaded)
    if args.calib == "builtin":
        if not loaded.is_sentence_model and loaded.tokenizer is None:
            raise ValueError(f"built-in calibration text needs a text model with a tokenizer; {loaded.spec!r} is a {loaded.kind} model: pass --calib FILE.pt")
        texts = calibration_sentences(size)
    else:
        path = Path(args.calib)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration file at {args.calib!r}")
        if path.suffix in (".pt", ".pth"):
            inputs = read_tensor_file(path, holds="model inputs, batch first (token ids of shape (N, L) for a text model)")
            if inputs.ndim < 1 or len(inputs) == 0:
                raise ValueError(f"{path} must hold one non-empty tensor of inputs (batch first)")
            if loaded.is_sentence_model:
                return _sentence_features(inputs[:size], batch, loaded, path)
            return list(inputs[:size].split(batch))
        if not loaded.is_sentence_model and loaded.tokenizer is None:
            raise ValueError(f"a text calibration file needs a text model; {loaded.spec!r} is a {loaded.kind} model: pass --calib FILE.pt")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}): pass one text per line, or a .pt tensor") from exc
        texts = [line.strip() for line in lines if line.strip()][:size]
        if not texts:
            raise ValueError(f"{path} holds no text")
    return [texts[i:i + batch] for i in range(0, len(texts), batch)]


def _sentence_features(ids, batch: int, loaded, path: Path) -> list:
    """Token ids for a sentence-transformers model, fed as its features (ids and a full mask)."""
    import torch

    from ..tokens import check_token_ids

    if ids.ndim != 2:
        raise ValueError(f"{path} holds a tensor of shape {tuple(ids.shape)}; a sentence model takes token ids of shape (N, L)")
    ids = check_token_ids(ids, loaded.vocab_size, where=str(path))
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(batch)]


def _sentence_quality(loaded, compressed) -> dict[str, float]:
    from ..compression import embedding_agreement
    from ..data import builtin_sentences

    quality = {}
    for label, texts in (("held-out", builtin_sentences("topics", split="odd")[:512]), ("other domain", builtin_sentences("idle")[:512])):
        agreement = embedding_agreement(loaded.encode(texts), loaded.encode(texts, module=compressed))
        quality[f"{label} mean cosine"] = agreement["mean_cosine"]
        quality[f"{label} top-10 overlap"] = agreement["neighbour_overlap"]
    return quality


def _lm_quality(loaded, module, progress: bool, tasks: bool = False) -> dict[str, Any]:
    from ..eval import greedy_continuation, language_model_quality

    quality: dict[str, Any] = {
        f"ppl {domain}": value for domain, value in language_model_quality(module, loaded.tokenizer, progress=progress).items()
    }
    quality["continuation"] = greedy_continuation(module, loaded.tokenizer, PROMPT)
    if tasks:
        from ..tasks import task_accuracy

        for name, scored in task_accuracy(module, loaded.tokenizer, progress=progress).items():
            quality[f"acc {name}"], quality[f"acc_norm {name}"] = scored.acc, scored.acc_norm
    return quality


def _check_options(args: argparse.Namespace) -> None:
    """Refuse, before the model is loaded, what the options alone make impossible."""
    from ..devices import check_device

    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (one token of context and one to predict in each window), got {args.seq_len}")
    calib_seqs = args.calib_seqs or LM_SEQS
    if args.gradient_seqs is not None and args.gradient_seqs > calib_seqs:
        raise ValueError(f"--gradient-seqs {args.gradient_seqs} is more than the {calib_seqs} calibration windows (--calib-seqs): "
                         "the curvature uses some of them; raise --calib-seqs or lower --gradient-seqs")
    if args.device is not None:
        check_device(args.device, field="--device")
    if args.heal_steps < 0 or not args.heal_lr > 0:
        raise ValueError(f"--heal-steps must be >= 0 and --heal-lr > 0, got {args.heal_steps} and {args.heal_lr}")
    if args.heal_steps and (args.stream or args.resume):
        raise ValueError("--heal-steps heals a model held in memory; after --stream or --resume, heal the directory with svdkit heal")
    if (args.stream or args.resume) and (args.quantize or args.speed):
        raise ValueError("--quantize and --speed work on the compressed model in memory; --stream and --resume write it block by "
                         "block: compress without --stream, or quantize the saved model with svdkit.quantization.quantize_weights")
    _config(args, None)  # the method, --uniform, --refit, the rank and quantization options
    check_quantize_platform(args)


def run(args: argparse.Namespace) -> int:
    from ..compression import compress, compress_sweep
    from ..compression.io import check_save_target
    from ..distributed import init_from_env
    from ..models import load_model

    group = init_from_env()  # under torchrun: one process of several; otherwise the only one
    lead = group.rank == 0
    outputs = output_directories(args)
    _check_options(args)
    if args.stream or args.resume:
        return _run_to_directory(args, group)
    check_outputs(directories=tuple(str(path) for _, path in outputs), files=(args.json,), overwrite=args.overwrite)
    for _, path in outputs:
        check_save_target(path, args.overwrite)  # not the current directory, nor a directory svdkit did not write
    progress = progress_option(args) and lead
    if lead:
        print(f"loading {args.model} ..." + (f" ({group.world} processes)" if group.active else ""), file=sys.stderr)
    with group.checked():  # a failure on one rank reaches every rank with its message
        loaded = load_model(args.model)
        check_model_options(args, loaded)
        config = _config(args, loaded)
        check_targets(args, config, loaded.module)
        check_quantize_model(args, loaded.module)
        calibration = _calibration(args, loaded) if config.needs_data else None
    before = _lm_quality(loaded, loaded.module, progress, args.tasks) if loaded.is_causal_lm and not args.no_eval and lead else None
    if lead:
        print(f"compressing with {config.method} ...", file=sys.stderr)
    forward = loaded.forward if loaded.is_sentence_model else None
    if len(outputs) > 1:  # one calibration, one set of statistics, several budgets
        results = compress_sweep(loaded.module, config, [b for b, _ in outputs], calibration, forward=forward, progress=progress)
    else:
        # A language model's dense quality is measured before: it is compressed in place, so that
        # memory holds one model. A sentence model's quality compares both, so it is copied.
        results = [compress(loaded.module, config, calibration, forward=forward, progress=progress, inplace=loaded.is_causal_lm)]
    if args.heal_steps and lead:
        results = [(_heal(args, loaded, compressed, progress, report), report) for compressed, report in results]
    if not lead:  # rank 0 alone measures and writes; the others wait to hear how it went
        with group.checked():
            pass
        return 0
    with group.checked():
        _finish(args, loaded, config, outputs, results, before, progress)
    return 0


def _heal(args: argparse.Namespace, loaded, compressed, progress: bool, report):
    """``--heal-steps``: distil the compressed model toward the dense one (loaded again: it was compressed in place)."""
    from ..compression.distill import HealConfig, heal_language_model
    from ..models import load_model
    from ..tokens import calibration_tokens

    print(f"healing: {args.heal_steps} steps of distillation from {args.model} ...", file=sys.stderr)
    dense = load_model(args.model)
    seq_len = args.seq_len or min(LM_SEQ_LEN, loaded.context_length or LM_SEQ_LEN)
    config = HealConfig(steps=args.heal_steps, lr=args.heal_lr)
    windows = calibration_tokens(args.calib, loaded.tokenizer, n_seqs=HEAL_WINDOWS + config.held_out, seq_len=seq_len, seed=args.calib_seed + 1,
                                 vocab_size=loaded.vocab_size)
    result = heal_language_model(compressed, dense.module, windows, config, progress=progress)
    report.quality["healing"] = result.summary()
    report.timings["healing"] = result.seconds
    del dense
    return compressed


def _run_to_directory(args: argparse.Namespace, group) -> int:
    """``--stream`` / ``--resume``: the block pipeline writes into OUTPUT block by block."""
    from ..compression import compress_to_directory
    from ..compression.io import PROGRESS_NAME, check_save_target
    from ..models import load_model

    if len(output_directories(args)) > 1:
        raise ValueError("--stream and --resume write one output: give one --params fraction")
    if args.stream and not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--stream reads a transformers checkpoint directory (config.json and safetensors) block by block; "
                         f"{args.model!r} is not one: compress it without --stream")
    fresh = not args.resume and not (Path(args.output) / PROGRESS_NAME).exists()  # compress_to_directory judges the rest
    check_outputs(directories=(args.output,) if fresh else (), files=(args.json,), overwrite=args.overwrite)
    if fresh:
        check_save_target(Path(args.output), args.overwrite)
    progress = progress_option(args) and group.rank == 0
    with group.checked():  # a failure on one rank reaches every rank with its message
        loaded = load_model(args.model, empty=args.stream)
        if not loaded.is_causal_lm:
            raise ValueError(f"--stream and --resume compress causal language models block by block; {args.model!r} is a {loaded.kind} model")
        check_model_options(args, loaded)
        config = _config(args, loaded)
        check_targets(args, config, loaded.module)
        calibration = _lm_calibration(args, loaded)
    if group.rank == 0:
        print(f"compressing {args.model} block by block into {args.output} ...", file=sys.stderr)
    report = compress_to_directory(
        args.model if args.stream else loaded.module, args.output, config, calibration, resume=args.resume,
        overwrite=args.overwrite, tokenizer=loaded.tokenizer, source_spec=args.model, progress=progress, dtype=args.dtype,
    )
    if group.rank == 0:
        print(report.to_table(), file=table_stream(args))
        write_json(args.json, report.to_json())
        empty = factorized_nothing(args, report, None)
        if empty is not None:
            raise ValueError(f"{empty}; {args.output} holds that dense copy: remove it")
        print(f"saved to {args.output}; measure it with: svdkit eval {args.output}", file=table_stream(args))
    return 0


def _finish(args: argparse.Namespace, loaded, config, outputs, results, before, progress: bool) -> None:
    """Measure, save and report each result (rank 0 only)."""
    from ..compression import save_compressed
    from ..eval import worst_ratio

    reports, refused = [], []
    for (budget, output), (compressed, report) in zip(outputs, results):
        empty = factorized_nothing(args, report, budget)
        if empty is not None:
            print(report.to_table(), file=table_stream(args))
            refused.append(f"{output} is not written: {empty}")
            continue
        if args.quantize:  # quality and speed are measured on the model as it is saved
            compressed, quantized = quantize(args, compressed)
            print(quantized.to_table(), file=table_stream(args))
        if not args.no_eval:
            if loaded.is_sentence_model:
                report.quality.update(_sentence_quality(loaded, compressed))
            elif before is not None:
                after = _lm_quality(loaded, compressed, progress, args.tasks)
                for key in before:
                    report.quality[f"{key} (dense -> compressed)"] = _before_after(before[key], after[key])
                worst, ratio = worst_ratio({k: v for k, v in after.items() if k.startswith("ppl ")}, before)
                report.quality["worst ppl ratio"] = f"{ratio:.2f}x ({worst[4:]})"
        if args.speed:
            report.speed.update(_speed_against_dense(args, loaded, compressed))
        used = config if budget is None else dataclasses.replace(config, budget=budget)
        save_compressed(compressed, output, source=args.model, config=used, tokenizer=loaded.tokenizer, report=report,
                        overwrite=args.overwrite, dtype=None if args.quantize else args.dtype)
        print(report.to_table(), file=table_stream(args))
        print(f"saved to {output} (load with svdkit.load_model({str(output)!r}))", file=table_stream(args))
        reports.append(report.to_dict())
    if reports:
        write_json(args.json, json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    if refused:
        raise ValueError("; ".join(refused))


def _speed_against_dense(args: argparse.Namespace, loaded, compressed) -> dict[str, float]:
    """``--speed``: the compressed model against the dense one (loaded again: it was compressed in
    place), timed interleaved."""
    from ..models import load_model

    if not loaded.is_causal_lm:
        raise ValueError(f"--speed times text generation; {args.model!r} is a {loaded.kind} model: drop --speed")
    print("timing decoding and prefill against the dense model ...", file=sys.stderr)
    return measure_speed(compressed, load_model(args.model).module)


def _before_after(before: Any, after: Any) -> str:
    if isinstance(before, float):
        return f"{before:.3f} -> {after:.3f} ({after / before:.2f}x)"
    return f"{before!r} -> {after!r}"
