"""Saving and loading compressed models: outputs reproduced, atomic writes, errors that name the problem."""

from __future__ import annotations

import contextlib
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



@pytest.mark.parametrize("family", ["vit", "bert"])
def test_a_model_built_without_a_submodule_reloads_without_it(tmp_path, family):
    """``ViTModel`` / ``BertModel(add_pooling_layer=False)``: the class builds a pooler from the
    config, the saved model had none; the description records it and loading leaves it out."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "vit":
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                        image_size=16, patch_size=4)
        model, inputs = transformers.ViTModel(config, add_pooling_layer=False), {"pixel_values": torch.randn(2, 3, 16, 16)}
    else:
        config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                         vocab_size=60)
        model, inputs = transformers.BertModel(config, add_pooling_layer=False), {"input_ids": torch.randint(0, 60, (2, 9))}
    out, _ = compress(model.eval(), CompressConfig(method="svd", rank=4))
    with pytest.warns(UserWarning, match="svdkit only") if family == "vit" else contextlib.nullcontext():  # LowRankConv2d
        save_compressed(out, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "svdkit_compressed.json").read_text())
    assert meta["absent_modules"] == ["pooler"]
    loaded = load_compressed(tmp_path / "c")
    assert loaded.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], out(**inputs)[0])

    meta["absent_modules"] = ["encoder.no_such_module"]
    (tmp_path / "c" / "svdkit_compressed.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not belong to the config.json.*'encoder.no_such_module' is listed.*no such module"):
        load_compressed(tmp_path / "c")
    meta["absent_modules"] = "pooler"
    (tmp_path / "c" / "svdkit_compressed.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'absent_modules' must be a list of module names"):
        load_compressed(tmp_path / "c")


def test_a_model_with_every_submodule_records_none_absent(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=60)
    out, _ = compress(transformers.BertModel(config).eval(), CompressConfig(method="svd", rank=4))
    save_compressed(out, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "svdkit_compressed.json").read_text())["absent_modules"] is None
    assert load_compressed(tmp_path / "c").pooler is not None


def test_a_transformers_model_of_a_class_outside_transformers_saves_and_loads_on_its_base(tmp_path):
    """Its config names a class transformers does not have: the directory loads on a base model of
    that class, or alone as the transformers model its config describes (without the pooler the
    saved model lacked)."""
    transformers = pytest.importorskip("transformers")

    class CustomBert(transformers.BertModel):
        pass

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=60)
    torch.manual_seed(0)
    out, _ = compress(CustomBert(config, add_pooling_layer=False).eval(), CompressConfig(method="svd", rank=4))
    with pytest.warns(UserWarning, match="not a class of transformers' public API"):
        save_compressed(out, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "svdkit_compressed.json").read_text())["absent_modules"] == ["pooler"]
    ids = torch.randint(0, 60, (2, 5))
    alone = load_compressed(tmp_path / "c")
    assert type(alone) is transformers.BertModel and alone.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "c", base=CustomBert(config, add_pooling_layer=False).eval())(ids)[0], out(ids)[0])
        torch.testing.assert_close(alone(ids)[0], out(ids)[0])
