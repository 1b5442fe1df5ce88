"""svdkit's weight analysis against the real WeightWatcher (``pip install 'svdkit[bench]'``)."""

import contextlib
import io
import logging

import pytest
import torch
from torch import nn

from svdkit.analysis.weights import analyze_weights

weightwatcher = pytest.importorskip("weightwatcher")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Passing a dict:Warning")
logging.getLogger("weightwatcher").setLevel(logging.ERROR)


def _ww(model):
    with contextlib.redirect_stdout(io.StringIO()):
        details = weightwatcher.WeightWatcher(model=model).analyze()
    return {row["longname"]: row for _, row in details.iterrows()}


def _check(table, ww, expected_layers):
    matched = [r for r in table if r["name"] in ww]
    assert len(matched) == expected_layers
    for record in matched:
        row = ww[record["name"]]
        assert record["alpha"] == pytest.approx(row["alpha"], abs=1e-6), record["name"]
        assert record["xmin"] == pytest.approx(row["xmin"], rel=1e-9)
        assert record["num_pl_spikes"] == row["num_pl_spikes"]
        for key in ("stable_rank", "log_norm", "log_spectral_norm", "alpha_weighted", "log_alpha_norm"):
            assert record[key] == pytest.approx(row[key], rel=1e-6), (record["name"], key)


def test_small_model_matches_weightwatcher():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 8, 5),  # pooled slices: 9 x 16 and 25 x 8 eigenvalues
        nn.Flatten(), nn.Linear(200, 120), nn.Linear(120, 300), nn.Embedding(500, 40), nn.Linear(30, 12),  # 12 eigenvalues: small-N fit
    )
    table = analyze_weights(model, conv2d="slices")
    _check(table, _ww(model), expected_layers=6)


@pytest.mark.slow
def test_gpt2_shape_matches_weightwatcher():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    table = analyze_weights(model, exclude=["transformer.wte", "lm_head"])
    _check(table, _ww(model), expected_layers=49)
