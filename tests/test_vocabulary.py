"""One name per idea: the public API and the CLI keep svdkit's vocabulary (PEFT's names where PEFT
has one), and no earlier spelling comes back as a parallel parameter or option.

=====================  ==================================================================
idea                   the one name
=====================  ==================================================================
layer selection        ``target_modules`` / ``exclude_modules`` (CLI ``--targets`` /
                       ``--exclude``; ``svdkit analyze --hook`` for the modules whose
                       outputs are analysed)
LoRA scaling           ``lora_alpha`` (CLI ``--lora-alpha``); ``asvd_alpha`` is ASVD's
                       exponent; ``alpha`` is left to the power-law exponent (a result)
SVD route              ``svd_method`` in {"auto", "exact", "randomized"} everywhere
eigenvalue route       ``eigen_route`` in {"auto", "gram", "svd"} (weight analysis)
=====================  ==================================================================
"""

from __future__ import annotations

import argparse
import importlib
import inspect

import pytest

from svdkit.cli import build_parser
from svdkit.linalg import SVD_METHODS

MODULES = (
    "svdkit", "svdkit.lora", "svdkit.analysis", "svdkit.compression", "svdkit.surgery", "svdkit.eval",
    "svdkit.layers.lora", "svdkit.linalg",
)
#: Earlier names of ideas that now have another one (LoRA's other earlier keywords, ``rank``,
#: ``init``, ``dropout``, are refused by tests/test_lora_config.py; ``rank`` stays the compression
#: rank's name).
RETIRED = {"targets", "exclude", "alpha", "aliases"}
#: The power-law exponent keeps WeightWatcher's name ``alpha``: a result's field, not an option.
ALLOWED = {("svdkit.analysis", "PowerLawFit", "alpha")}


def _callables(module_name: str):
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            yield name, obj
            for attr, member in vars(obj).items():
                member = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                if inspect.isfunction(member) and not attr.startswith("_"):
                    yield f"{name}.{attr}", member
        elif inspect.isfunction(obj):  # not typing aliases such as RankLike
            yield name, obj


def _parameters(obj) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return []


def test_the_walk_sees_the_public_api():
    names = {name for module in MODULES for name, _ in _callables(module)}
    assert {"add_lora", "extract_lora", "LoRAConfig", "analyze_weights", "analyze_activations", "compare_activations",
            "SpectralTracker", "compress", "CompressConfig", "find_targets", "wrap_lora", "weight_deltas"} <= names


@pytest.mark.parametrize("module_name", MODULES)
def test_no_public_function_takes_a_retired_name(module_name):
    offenders = []
    for name, obj in _callables(module_name):
        for parameter in _parameters(obj):
            if parameter.name in RETIRED and (module_name, name, parameter.name) not in ALLOWED:
                kind = "**" if parameter.kind is inspect.Parameter.VAR_KEYWORD else ""
                offenders.append(f"{module_name}.{name}({kind}{parameter.name})")
    assert not offenders, f"retired parameter names are back: {offenders}"


@pytest.mark.parametrize("module_name", MODULES)
def test_no_public_function_collects_keyword_aliases(module_name):
    """A ``**kwargs`` on a public function would let any spelling through unchecked."""
    allowed = {"forward", "__init__"}  # LoRALayer.forward passes a layer's extra arguments to its base layer
    offenders = [
        f"{module_name}.{name}(**{p.name})"
        for name, obj in _callables(module_name)
        for p in _parameters(obj)
        if p.kind is inspect.Parameter.VAR_KEYWORD and name.rsplit(".", 1)[-1] not in allowed and not inspect.isclass(obj)
    ]
    assert not offenders, offenders


def _options(parser: argparse.ArgumentParser, path: str = "svdkit"):
    """(command path, action) of every option of every subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif action.option_strings:
            yield path, action


def test_the_cli_spells_every_idea_once():
    options = list(_options(build_parser()))
    strings = {s for _, action in options for s in action.option_strings}
    assert not strings & {"--alpha", "--layers", "--calibration", "--target-modules", "--exclude-modules"}
    for path, action in options:
        if "--svd-method" in action.option_strings:  # one value set under one flag
            assert tuple(action.choices) == SVD_METHODS, path
        if "--eigen-route" in action.option_strings:
            assert tuple(action.choices) == ("auto", "gram", "svd"), path
    commands = {path for path, action in options if "--svd-method" in action.option_strings}
    assert commands == {"svdkit lora extract"}
    assert {path for path, action in options if "--lora-alpha" in action.option_strings} == {"svdkit lora extract"}
    # data the compression is fitted to (calibration, healing) is --calib, data analysed or scored is --data
    assert {path for path, action in options if "--calib" in action.option_strings} == {"svdkit compress", "svdkit heal"}
    assert {path for path, action in options if "--data" in action.option_strings} == {"svdkit analyze", "svdkit eval"}
