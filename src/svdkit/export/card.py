"""The model card (``README.md``) of a saved compressed model."""

from __future__ import annotations

import json
import statistics
from typing import Any, Mapping

__all__ = ["model_card", "rank_summary"]


def rank_summary(layers: Mapping[str, Any]) -> list[tuple[str, int, int, float, int]]:
    """Ranks per kind of layer: (layer name without its block index, count, min, median, max).

    ``model.layers.3.self_attn.q_proj`` counts as ``self_attn.q_proj``; a layer outside a stack of
    blocks keeps its whole name.
    """
    groups: dict[str, list[int]] = {}
    for name, spec in layers.items():
        if not isinstance(spec, Mapping) or "rank" not in spec:
            continue
        parts = name.split(".")
        digits = [i for i, part in enumerate(parts) if part.isdigit()]
        key = ".".join(parts[digits[-1] + 1:]) if digits else name
        groups.setdefault(key or name, []).append(int(spec["rank"]))
    return [(key, len(r), min(r), statistics.median(r), max(r)) for key, r in groups.items()]


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _budget(config: Mapping[str, Any] | None) -> str:
    if not config:
        return "not recorded"
    if config.get("budget") is not None:
        return f"global budget: keep {config['budget']:.0%} of the {config.get('budget_scope', 'targets')}' parameters"
    rank = config.get("rank")
    return f"rank {json.dumps(rank)} per layer" if rank is not None else "not recorded"


def model_card(name: str, description: Mapping[str, Any], quality: Mapping[str, Any] | None = None) -> str:
    """Markdown with YAML front matter for a saved directory.

    Parameters
    ----------
    name : str
        The directory's name (the card's title).
    description : mapping
        The saved description (``svdkit_compressed.json``): its ``source``, ``config``,
        ``report`` totals, ``layers``, ``dtype``, ``transformers`` (how plain transformers
        loads it, or why it cannot) and, when present, ``quantization`` and ``speed``.
    quality : mapping, optional
        The report's quality figures (a table when given).
    """
    config = description.get("config") or {}
    totals = description.get("report") or {}
    export = description.get("transformers") or {}
    auto_class = export.get("auto_class")
    source = description.get("source") or "not recorded"
    front = ["---"]
    if auto_class:
        front.append("library_name: transformers")
        if auto_class == "AutoModelForCausalLM":
            front.append("pipeline_tag: text-generation")
    front += ["tags:", "  - svdkit", "  - low-rank", "  - svd", "  - compressed"]
    if auto_class:
        front.append("  - custom_code")
    front.append("---")
    version = description.get("svdkit_version")
    lines = [*front, "", f"# {name}", "", f"`{source}` compressed into low-rank factors by svdkit{' ' + version if version else ''}.", ""]
    lines += [
        "| | |", "|---|---|",
        f"| source model | `{source}` |",
        f"| method | {config.get('method', 'not recorded')} |",
        f"| budget | {_budget(config)} |",
        f"| saved dtype | {description.get('dtype') or 'not recorded'} |",
    ]
    quantized = description.get("quantization")
    if quantized:
        group = f", groups of {quantized['group_size']}" if quantized.get("group_size") else ""
        lines.append(f"| weight quantization | torchao {quantized.get('mode')} weight-only{group}, {len(quantized.get('tensors', {}))} weights |")
    if totals:
        lines += [
            f"| factorized layers | {totals.get('compressed', 0)} of {totals.get('layers', 0)} targeted |",
            f"| targeted parameters | {_number(totals.get('target_params_before', 0))} -> {_number(totals.get('target_params_after', 0))} "
            f"({totals.get('target_kept_fraction', 0):.1%} kept) |",
            f"| model parameters | {_number(totals.get('model_params_before', 0))} -> {_number(totals.get('model_params_after', 0))} "
            f"({totals.get('model_kept_fraction', 0):.1%} kept) |",
        ]
    summary = rank_summary(description.get("layers") or {})
    if summary:
        lines += ["", "## Ranks", "", "| layer | count | min | median | max |", "|---|---:|---:|---:|---:|"]
        lines += [f"| `{key}` | {count} | {low} | {_number(mid)} | {high} |" for key, count, low, mid, high in summary]
    if quality:
        lines += ["", "## Quality", "", "| measure | value |", "|---|---|"]
        lines += [f"| {_number(key)} | {_number(value)} |" for key, value in quality.items()]
    speed = description.get("speed")
    if speed:
        lines += ["", "## Speed (against the dense model, timed interleaved on the machine that compressed it)", "",
                  "| measure | value |", "|---|---|"]
        lines += [f"| {_number(key)} | {_number(value)} |" for key, value in speed.items()]
    lines += ["", "## Loading", "", "With svdkit (`pip install svdkit`):", "", "```python", "import svdkit", "",
              'model = svdkit.load_compressed("path/to/this/directory")', "```", ""]
    if auto_class:
        lines += [
            "Without svdkit, with transformers alone (the modeling file `modeling_svdkit.py` in this directory "
            "subclasses the base model's classes and puts the low-rank layers in place):", "", "```python",
            f"from transformers import {auto_class}", "",
            f'model = {auto_class}.from_pretrained("path/to/this/directory", trust_remote_code=True)', "```",
        ]
        if quantized:
            lines += ["", f"The weights are quantized with torchao ({quantized.get('torchao_version')} wrote them): transformers "
                          "reads them through its `TorchAoConfig` support, which needs `pip install torchao`."]
    else:
        lines.append(f"Plain transformers cannot load this directory: {export.get('reason') or 'not recorded'}.")
    return "\n".join(lines) + "\n"
