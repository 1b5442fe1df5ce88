"""Nothing silently wrong, nothing lost: bad input and faults in compression, saving and loading.

Each case of the trust issue has its regression test here: non-finite calibration, tied
weights, a module used twice, failed in-place loads, damaged files, wrong-shape batches, and
the property that a failure leaves the input model and any existing output exactly as they were.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from svdkit import CompressConfig, compress, load_compressed, save_compressed
from svdkit.batches import NonFiniteData
from svdkit.cli import main
from svdkit.layers import LowRankLayer
from svdkit.linalg import ParamRatio

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 16, generator=g) for _ in range(n)]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "types": [type(m) for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["types"] == before["types"] and after["training"] == before["training"]
    assert after["grad"] == before["grad"] and after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0, equal_nan=True)


# --- 1. a non-finite calibration batch is an error, never plain SVD in disguise ---------------------


@pytest.mark.parametrize("method", ["whiten", "fisher", "asvd"])
def test_a_nan_batch_names_the_batch_and_the_first_layer(method):
    data = batches() + [torch.full((16, 16), float("nan"))]
    with pytest.raises(NonFiniteData, match=r"calibration batch 4: the input of layer 0 holds NaN"):
        compress(mlp(), CompressConfig(method=method, rank=4), data)


def test_nan_that_appears_inside_the_model_names_the_layer_it_reaches():
    model = mlp()
    with torch.no_grad():
        model[2].bias[0] = float("inf")  # not a target: only layers 0 and 4 are compressed
    with pytest.raises(NonFiniteData, match=r"calibration batch 0: the input of layer 4"):
        compress(model, CompressConfig(method="whiten", rank=4, target_modules=["0", "4"]), batches())


def test_a_zero_gram_is_a_different_message():
    data = [torch.zeros(8, 16)] * 2
    _, report = compress(mlp(), CompressConfig(method="whiten", rank=4, target_modules=["0"]), data)
    assert "the Gram matrix is zero" in report.layers[0].skip_reason and report.layers[0].method == "svd"


def test_nan_weights_and_biases_are_refused_before_any_work():
    model = mlp()
    with torch.no_grad():
        model[2].bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"layer 2 \(Linear, bias \(32,\)\) has 1 non-finite values"):
        compress(model, CompressConfig(method="svd", rank=4))


# --- 2. tied weights stay tied, and the report counts them once ------------------------------------


@pytest.fixture
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("options", [dict(target_modules=["lm_head"]), dict(include_head=True, include_embeddings=True)])
def test_a_tied_head_is_factorized_once_and_stays_tied(gpt2, options, tmp_path):
    ids = [torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    small, report = compress(gpt2, CompressConfig(method="whiten", rank=4, **options), ids)
    assert _params(small) < _params(gpt2)  # smaller, not bigger
    assert report.model_params_after == _params(small)
    assert report.model_params_before - report.target_params_before + report.target_params_after == _params(small)
    assert small.lm_head.u is small.transformer.wte.u and small.lm_head.v is small.transformer.wte.v
    small.tie_weights()  # does not raise: the factors are shared, the config no longer asks to tie
    rows = {row.name: row for row in report.layers}
    assert rows["transformer.wte"].params_before == 0 and "tied to lm_head" in rows["transformer.wte"].skip_reason
    save_compressed(small, tmp_path / "c")
    again = load_compressed(tmp_path / "c")
    assert again.lm_head.u is again.transformer.wte.u
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, small(x).logits)


def test_two_linears_sharing_one_parameter_share_one_factorization():
    torch.manual_seed(0)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight
    model = nn.Sequential(a, nn.GELU(), b)
    small, report = compress(model, CompressConfig(method="svd", rank=3))
    assert small[0].u is small[2].u and small[0].v is small[2].v
    assert report.model_params_after == _params(small) < _params(model)


# --- 3. a module used twice is replaced at both places ----------------------------------------------


def test_a_module_used_twice_is_replaced_everywhere(tmp_path):
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    small, report = compress(model, CompressConfig(method="svd", rank=4))
    assert small[0] is small[2] and isinstance(small[0], LowRankLayer)
    assert _params(small) == report.model_params_after == 4 * 64 + 32 < _params(model)
    save_compressed(small, tmp_path / "c")
    shared = nn.Linear(32, 32)
    again = load_compressed(tmp_path / "c", base=nn.Sequential(shared, nn.ReLU(), shared))
    assert again[0] is again[2]
    x = torch.randn(3, 32)
    torch.testing.assert_close(again(x), small(x))


# --- 4. a failed load leaves the base as it was --------------------------------------------------------


def _saved(tmp_path: Path) -> Path:
    small, _ = compress(mlp(), CompressConfig(method="svd", rank=4))
    return save_compressed(small, tmp_path / "c")


@pytest.mark.parametrize("damage", ["missing key", "truncated file", "flipped byte", "wrong shape"])
def test_a_failed_in_place_load_does_not_touch_the_base(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    directory = _saved(tmp_path)
    weights = directory / "model.safetensors"
    if damage == "missing key":
        state = load_file(weights)
        state.pop("2.u")
        save_file(state, weights)
    elif damage == "truncated file":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flipped byte":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        meta = json.loads((directory / "svdkit_compressed.json").read_text())
        meta["layers"]["2"]["rank"] = 5
        (directory / "svdkit_compressed.json").write_text(json.dumps(meta))
    base = mlp(seed=3)
    before = _snapshot(base)
    if damage != "wrong shape":  # the weights file changed: its hash says so
        with pytest.raises(ValueError, match="SHA-256"):
            load_compressed(directory, base, inplace=True)
        _assert_unchanged(base, before)
    if damage != "flipped byte":  # without the hash, the structure still gives it away
        with pytest.raises(ValueError, match="does not fit|cannot read"):
            load_compressed(directory, base, inplace=True, verify=False)
        _assert_unchanged(base, before)


@pytest.mark.parametrize("edit, message", [
    (lambda spec: spec.pop("rank"), "missing field 'rank'"),
    (lambda spec: spec.update(rank="4"), "field 'rank' must be int, got '4'"),
    (lambda spec: spec.update(rank=0), "rank must be >= 1"),
    (lambda spec: spec.update(type="Mystery"), "unknown type 'Mystery'"),
])
def test_a_hand_edited_description_names_the_layer_and_field(tmp_path, edit, message):
    directory = _saved(tmp_path)
    meta = json.loads((directory / "svdkit_compressed.json").read_text())
    edit(meta["layers"]["2"])
    (directory / "svdkit_compressed.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"saved layer 2.*{message}"):
        load_compressed(directory, mlp())


# --- saving: never delete what is not ours, never lose the old copy --------------------------------------


def test_overwrite_refuses_a_directory_that_is_not_an_svdkit_output(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    small, _ = compress(mlp(), CompressConfig(method="svd", rank=4))
    with pytest.raises(ValueError, match="not an svdkit compressed model directory"):
        save_compressed(small, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_saving_into_the_current_directory_is_refused_cleanly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small, _ = compress(mlp(), CompressConfig(method="svd", rank=4))
    with pytest.raises(ValueError, match="current directory"):
        save_compressed(small, ".", overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_replacement_restores_the_old_directory(tmp_path, monkeypatch):
    directory = _saved(tmp_path)
    old = {p.name: p.read_bytes() for p in directory.iterdir()}
    real_replace = os.replace
    calls = {"n": 0}

    def second_rename_fails(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    small, _ = compress(mlp(seed=9), CompressConfig(method="svd", rank=2))
    with pytest.raises(OSError, match="disk full"):
        save_compressed(small, directory, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no staging or retired folders left


# --- wrong-shape or wrong-type calibration names the batch and the layer ----------------------------------


def test_a_wrong_shape_batch_names_the_batch_and_the_layer():
    data = batches(2) + [torch.randn(16, 12)]
    with pytest.raises(ValueError, match=r"calibration batch 2 reaches layer '0' as a tensor of shape \(16, 12\), but the layer takes 16"):
        compress(mlp(), CompressConfig(method="whiten", rank=4), data)


def test_a_rank_pattern_key_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"rank_pattern: 1 key\(s\) match none.*'3'"):
        compress(mlp(), CompressConfig(method="svd", rank=4, rank_pattern={"3": 2}))


# --- the CLI: user errors are one line, checked before any work ----------------------------------------


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "tiny_factory.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tiny_factory:build"
    import sys

    sys.modules.pop("tiny_factory", None)


def test_cli_user_errors_are_one_line(tmp_path, capsys, factory):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle")
    cases = [
        (["compress", str(garbage), "-o", str(tmp_path / "o")], "cannot load a module from"),
        (["compress", factory, "-o", str(tmp_path / "o"), "--calib", str(garbage)], "garbage.pt: it is not a file written by torch.save"),
        (["compress", factory, "-o", str(tmp_path / "o"), "--json", str(tmp_path / "nowhere" / "r.json")], "does not exist"),
        (["compress", factory, "-o", str(tmp_path / "o")], "built-in calibration text needs a text model"),
    ]
    shape = tmp_path / "shape.pt"
    torch.save(torch.randn(8, 5), shape)
    cases.append((["compress", factory, "-o", str(tmp_path / "o"), "--calib", str(shape)], "calibration batch 0 reaches layer '0' as a tensor of shape (8, 5)"))
    text = tmp_path / "lines.txt"
    text.write_text("one line of text\n")
    cases.append((["compress", factory, "-o", str(tmp_path / "o"), "--calib", str(text)], "a text calibration file needs a text model"))
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit:  # argparse refuses a size of zero before anything runs
        main(["compress", factory, "-o", str(tmp_path / "o"), "--calib-seqs", "0"])
    assert exit.value.code == 2 and "--calib-seqs: expected an integer >= 1, got '0'" in capsys.readouterr().err


# --- properties over random small models ------------------------------------------------------------


class _Net(nn.Module):
    """A small model drawn by hypothesis: Linear/Conv1D/Conv2d layers, a shared parameter, a module used twice."""

    def __init__(self, width: int, conv: bool, share: bool, reuse: bool, conv1d: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1) if conv else None
        first = 4 * 4 * 4 if conv else 8
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.a = Conv1D(width, first)
        else:
            self.a = nn.Linear(first, width)
        self.b = nn.Linear(width, width)
        self.c = nn.Linear(width, width)
        if share:
            self.c.weight = self.b.weight
        self.reuse = reuse
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        if self.conv is not None:
            x = torch.relu(self.conv(x)).flatten(1)
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        h = torch.tanh(self.c(h))
        if self.reuse:
            h = torch.tanh(self.b(h))
        return self.out(h)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(width=st.integers(6, 20), conv=st.booleans(), share=st.booleans(), reuse=st.booleans(), conv1d=st.booleans(),
       method=st.sampled_from(["svd", "whiten", "fisher"]), budget=st.sampled_from([None, 0.5]), seed=st.integers(0, 100))
def test_compression_properties_on_random_models(tmp_path_factory, width, conv, share, reuse, conv1d, method, budget, seed):
    pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = _Net(width, conv, share, reuse, conv1d).train()
    shape = (6, 2, 4, 4) if conv else (6, 8)
    data = [torch.randn(*shape) for _ in range(3)]
    before = _snapshot(model)
    config = CompressConfig(method=method, rank=ParamRatio(0.5)) if budget is None else CompressConfig(method=method, budget=budget)
    small, report = compress(model, config, data)
    _assert_unchanged(model, before)  # state, training flags, requires_grad and hooks
    assert report.model_params_after == _params(small)  # the report is honest
    assert report.model_params_before - report.target_params_before + report.target_params_after == _params(small)
    if share and isinstance(small.b, LowRankLayer):
        assert small.c.u is small.b.u  # tied weights stay tied
    directory = tmp_path_factory.mktemp("c") / "m"
    save_compressed(small, directory)
    base = _Net(width, conv, share, reuse, conv1d)
    again = load_compressed(directory, base)
    x = torch.randn(*shape)
    small.eval(), again.eval()
    torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)  # save -> load reproduces outputs exactly


def test_an_injected_failure_leaves_the_model_and_the_output_as_they_were(tmp_path, monkeypatch):
    from svdkit.compression import saved

    model = mlp()
    directory = _saved(tmp_path)
    old = {p.name: p.read_bytes() for p in directory.iterdir()}
    before = _snapshot(model)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(saved, "sha256", fail)  # fails after the weights were written to staging
    small, _ = compress(model, CompressConfig(method="whiten", rank=3), batches())
    with pytest.raises(RuntimeError, match="injected"):
        save_compressed(small, directory, overwrite=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    monkeypatch.setattr("svdkit.compression.plan.LayerPlan.build", fail)  # fails in the middle of compress
    with pytest.raises(RuntimeError, match="injected"):
        compress(model, CompressConfig(method="whiten", rank=3), batches(), inplace=False)
    _assert_unchanged(model, before)


def test_cli_sweep_writes_one_output_per_budget(tmp_path, capsys, factory):
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(64, 16), calib)
    code = main(["compress", factory, "-o", str(tmp_path / "m"), "--calib", str(calib), "--params", "0.4,0.7",
                 "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert code == 0
    reports = json.loads((tmp_path / "r.json").read_text())
    assert [round(r["totals"]["target_kept_fraction"] <= b + 1e-9) for r, b in zip(reports, (0.4, 0.7))] == [1, 1]
    for suffix, budget in (("40", 0.4), ("70", 0.7)):
        meta = json.loads((tmp_path / f"m-{suffix}" / "svdkit_compressed.json").read_text())
        assert meta["config"]["budget"] == budget


def test_one_token_windows_are_refused_before_any_work(make_decoder):
    """A window of one token has no next token: the LM curvature would be zero and every layer
    would fall to rank 1 whatever the budget (it did, silently)."""
    model = make_decoder("llama", causal=True)
    ones = [torch.randint(0, 100, (4, 1), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(ValueError, match=r"calibration batch 0 holds windows of 1 token: curvature='labels' .* at least 2 tokens \(--seq-len\)"):
        compress(model, CompressConfig(budget=0.8), ones)
    _, report = compress(model, CompressConfig(method="whiten", budget=0.8), ones)  # no curvature: one token is data enough
    assert 0.7 < report.kept_fraction <= 0.8 + 1e-9


def test_layers_sharing_a_weight_keep_the_models_tied_embedding_tied(make_decoder, tmp_path):
    """Two projections that share one weight are factorized once; the embedding and the head,
    untouched, stay tied in the saved config (the config's tie was dropped before, and loading failed)."""
    model = make_decoder("llama", causal=True, tied=True)
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    small, report = compress(model, CompressConfig(method="svd", rank=4))
    assert small.config.tie_word_embeddings and small.lm_head.weight is small.model.embed_tokens.weight
    save_compressed(small, tmp_path / "c", report=report)
    again = load_compressed(tmp_path / "c")
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, small(ids).logits, rtol=0, atol=0)
