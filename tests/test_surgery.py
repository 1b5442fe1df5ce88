"""svdkit.surgery's name matching against PEFT's own functions: ``target_modules`` / ``exclude_modules``
(``peft.tuners.tuners_utils.check_target_module_exists``) and ``rank_pattern`` / ``alpha_pattern``
keys (``peft.utils.other.get_pattern_key``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from svdkit.surgery import find_targets, matches_target, pattern_key

peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

Q0 = "model.layers.0.self_attn.q_proj"
K0 = "model.layers.0.self_attn.k_proj"
Q1 = "model.layers.1.self_attn.q_proj"
Q10 = "model.layers.10.self_attn.q_proj"
DOWN0 = "model.layers.0.mlp.down_proj"


def _peft_selects(name: str, target_modules, exclude_modules) -> bool:
    config = peft.LoraConfig(target_modules=target_modules, exclude_modules=exclude_modules)
    return bool(check_target_module_exists(config, name))


def _svdkit_selects(name: str, target_modules, exclude_modules) -> bool:
    excluded = bool(exclude_modules) and matches_target(name, exclude_modules)
    return matches_target(name, target_modules) and not excluded


TARGET_CASES = [
    # (name, target_modules, exclude_modules, selected): what PEFT does, spelled out
    (Q0, ["q_proj"], None, True),                        # a list entry: suffix at a dot boundary
    (Q0, ["proj"], None, False),                         # a suffix that is not at a dot boundary
    (Q0, ["_proj"], None, False),
    (Q0, ["self_attn.q_proj"], None, True),              # a dotted suffix
    (Q0, ["attn.q_proj"], None, False),                  # ... that starts inside a name part
    ("q_proj", ["q_proj"], None, True),                  # the whole name
    (Q0, [Q0], None, True),
    (Q0, ["q.proj"], None, False),                       # list entries are literal: "." is a dot
    (Q0, ("k_proj", "q_proj"), None, True),              # a tuple is a list
    (Q0, r".*q_proj", None, True),                       # a string: a regex that must match the full name
    (Q0, "q_proj", None, False),                         # ... so a plain string is not a suffix
    (Q0, "q_proj.*", None, False),
    (Q0, r".*\.(q|v)_proj", None, True),
    (K0, r".*\.(q|v)_proj", None, False),
    ("q_proj", "q_proj|v_proj", None, True),
    ("a.q_proj", "q_proj|v_proj", None, False),
    (Q1, r".*layers\.1\..*", None, True),
    (Q10, r".*layers\.1\..*", None, False),               # layer 10 is not layer 1
    (Q0, r".*q.proj", None, True),                       # in a regex "." is any character
    (DOWN0, ["down_proj"], ["layers.0.mlp.down_proj"], False),  # excluded by a dotted suffix
    (DOWN0, ["down_proj"], ["mlp.down_proj"], False),
    (DOWN0, ["down_proj"], ["mlp"], True),               # excluding a parent's name leaves its children
    (DOWN0, ["down_proj"], ["own_proj"], True),          # an exclusion not at a dot boundary excludes nothing
    (Q0, ["q_proj"], r".*layers\.0\..*", False),          # exclude_modules as a full-match regex
    (Q1, ["q_proj"], r".*layers\.0\..*", True),
    (Q0, ["q_proj"], "q_proj", True),                    # a plain exclude string is a regex on the full name
    (Q0, r".*_proj", ["q_proj", "k_proj"], False),        # regex targets, list exclusions
    (DOWN0, r".*_proj", ["q_proj", "k_proj"], True),
    ("lm_head", ["lm_head"], ["lm_head"], False),         # exclusion wins
]


@pytest.mark.parametrize("name, target_modules, exclude_modules, selected", TARGET_CASES)
def test_target_and_exclude_modules_match_as_peft_does(name, target_modules, exclude_modules, selected):
    assert _peft_selects(name, target_modules, exclude_modules) is selected  # the table states PEFT's rule
    assert _svdkit_selects(name, target_modules, exclude_modules) is selected


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attention()
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(8, 16), "down_proj": nn.Linear(16, 8)})


class _Decoder(nn.Module):
    def __init__(self, layers: int = 12) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_Block() for _ in range(layers))


@pytest.mark.parametrize("target_modules, exclude_modules", [
    (["q_proj", "v_proj"], None),
    (["proj"], None),
    (r".*layers\.1\..*_proj", None),
    (r".*\.(q|k)_proj", ["layers.0.self_attn.q_proj"]),
    (["mlp.down_proj", "up_proj"], r".*layers\.1[0-9]*\..*"),
    (["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], ["mlp"]),
])
def test_find_targets_selects_the_layers_peft_selects(target_modules, exclude_modules):
    model = _Decoder()
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    expected = [name for name in linears if _peft_selects(name, target_modules, exclude_modules)]
    found = find_targets(model, target_modules, exclude_modules=exclude_modules or ())
    assert [name for name, _ in found] == expected


PATTERN_CASES = [
    # (keys in order, name, the key PEFT's get_pattern_key picks, or None)
    (["q_proj"], Q0, "q_proj"),                           # a suffix at a dot boundary
    (["proj"], Q0, None),                                 # not at a dot boundary
    (["attn.q_proj"], Q0, None),
    (["self_attn.q_proj"], Q0, "self_attn.q_proj"),
    ([Q0], Q0, Q0),                                       # the whole name
    ([r"layers\.0\..*"], Q0, r"layers\.0\..*"),            # a regex matched against the end of the name
    ([r"layers\.1\..*"], Q10, None),
    ([r"layers\.1\d\..*"], Q10, r"layers\.1\d\..*"),
    (["q.proj"], Q0, "q.proj"),                           # keys are regexes: "." is any character
    ([r"(q|v)_proj"], K0, None),
    (["q_proj", r"layers\.0\..*"], Q0, "q_proj"),          # the first matching key wins, in the given order
    ([r"layers\.0\..*", "q_proj"], Q0, r"layers\.0\..*"),
    (["k_proj", "down_proj"], Q0, None),
]


@pytest.mark.parametrize("keys, name, expected", PATTERN_CASES)
def test_rank_pattern_keys_match_as_peft_does(keys, name, expected):
    peft_key = get_pattern_key(keys, name)  # PEFT returns the name itself when no key matches
    assert (peft_key if peft_key in keys else None) == expected
    assert pattern_key(keys, name) == expected


_PARTS = st.sampled_from(["model", "layers", "0", "1", "10", "self_attn", "attn", "q_proj", "proj", "mlp", "down_proj"])


@settings(max_examples=300, deadline=None)
@given(
    name=st.lists(_PARTS, min_size=1, max_size=5).map(".".join),
    targets=st.lists(st.lists(_PARTS, min_size=1, max_size=2).map(".".join), min_size=1, max_size=3),
    excludes=st.lists(st.lists(_PARTS, min_size=1, max_size=2).map(".".join), max_size=2),
)
def test_lists_of_names_and_suffixes_agree_with_peft_on_random_names(name, targets, excludes):
    assert _svdkit_selects(name, targets, excludes) == _peft_selects(name, targets, excludes or None)
    peft_key = get_pattern_key(targets, name)
    assert pattern_key(targets, name) == (peft_key if peft_key in targets else None)
