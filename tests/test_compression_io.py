"""Saving and loading compressed models: outputs reproduced, atomic writes, errors that name the problem."""

from __future__ import annotations

import json

import pytest
import torch

from svdkit.compression import CompressConfig, compress, decompress, load_compressed, save_compressed
from svdkit.layers import LowRankConv2d, LowRankLinear
from svdkit.linalg import ParamRatio

from compression_helpers import cnn, mlp


def test_save_load_reproduces_outputs(tmp_path):
    model = cnn()
    batches = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    out, _ = compress(model, CompressConfig(method="whiten", rank=ParamRatio(0.5)), batches)
    config = CompressConfig(method="whiten", rank=ParamRatio(0.5))
    save_compressed(out, tmp_path / "c", config=config)
    meta = json.loads((tmp_path / "c" / "svdkit_compressed.json").read_text())
    assert meta["format_version"] == 3 and meta["config"]["method"] == "whiten"
    loaded = load_compressed(tmp_path / "c", base=cnn(seed=5))
    x = torch.randn(3, 3, 12, 12)
    torch.testing.assert_close(loaded(x), out(x))
    dense = decompress(loaded)
    assert not any(isinstance(m, (LowRankConv2d, LowRankLinear)) for m in dense.modules())
    torch.testing.assert_close(dense(x), out(x), rtol=1e-4, atol=1e-5)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    out, _ = compress(mlp(), CompressConfig(method="svd", rank=3))
    save_compressed(out, tmp_path / "c")
    with pytest.raises(FileExistsError):
        save_compressed(out, tmp_path / "c")
    save_compressed(out, tmp_path / "c", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_load_errors(tmp_path):
    out, _ = compress(mlp(), CompressConfig(method="svd", rank=3))
    save_compressed(out, tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        load_compressed(tmp_path / "missing", base=mlp())
    with pytest.raises(ValueError, match="does not fit"):
        load_compressed(tmp_path / "c", base=mlp(width=32))
    meta_path = tmp_path / "c" / "svdkit_compressed.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(ValueError, match="format version 99"):
        load_compressed(tmp_path / "c", base=mlp())
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        load_compressed(tmp_path / "c", base=mlp())
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="SHA-256"):
        load_compressed(tmp_path / "c", base=mlp())
    with pytest.raises(ValueError, match="cannot read"):
        load_compressed(tmp_path / "c", base=mlp(), verify=False)
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_compressed(tmp_path / "c", base=mlp())

