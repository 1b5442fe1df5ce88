"""``svdkit lora extract`` and ``svdkit lora analyze`` on tiny transformers directories."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from svdkit.cli import main

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from transformers import GPT2Config, GPT2Model

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    base = GPT2Model(config).eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in tuned.h:
            for conv in (block.attn.c_attn, block.mlp.c_fc):
                nx, nf = conv.weight.shape
                conv.weight.add_(0.1 * torch.randn(nx, 3, generator=g) @ torch.randn(3, nf, generator=g))
    base.save_pretrained(root / "base")
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned", base, tuned


def test_extract_writes_a_peft_adapter_that_reproduces_the_fine_tune(model_dirs, tmp_path, capsys):
    base_dir, tuned_dir, base, tuned = model_dirs
    out = tmp_path / "adapter"
    assert main(["lora", "extract", str(base_dir), str(tuned_dir), "-o", str(out), "--rank", "3"]) == 0
    printed = capsys.readouterr().out
    assert "h.0.attn.c_attn" in printed and "100.00%" in printed and "unchanged" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["fan_in_fan_out"] is True
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    report = json.loads((out / "extraction_report.json").read_text())
    assert len(report["layers"]) == 4
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, tuned(ids).last_hidden_state, rtol=0, atol=1e-5)


def test_extract_with_an_energy_target_and_json(model_dirs, tmp_path, capsys):
    base_dir, tuned_dir, _, _ = model_dirs
    assert main(["lora", "extract", str(base_dir), str(tuned_dir), "-o", str(tmp_path / "out"), "--energy", "0.8", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank"] == {"kind": "energy", "value": 0.8}
    assert all(layer["energy_captured"] >= 0.8 and layer["rank"] <= 3 for layer in report["layers"])


def test_analyze_prints_the_spectrum_table(model_dirs, capsys):
    base_dir, tuned_dir, _, _ = model_dirs
    assert main(["lora", "analyze", str(base_dir), str(tuned_dir), "--targets", "c_attn", "--ranks", "1,3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["layer", "shape", "|dW|/|W|", "err@1", "err@3"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    assert all(float(r[4]) < 1e-3 for r in rows)  # rank 3 recovers a rank-3 change
    assert main(["lora", "analyze", str(base_dir), str(tuned_dir), "--json", "-"]) == 0
    spectra = json.loads(capsys.readouterr().out)["layers"]
    assert len(spectra) == 8 and {"rank_90", "rank_99", "top_energy_share"} <= set(spectra[0])


def test_cli_errors_are_clear(model_dirs, tmp_path, capsys):
    from transformers import GPT2Config, GPT2Model

    base_dir, _, _, _ = model_dirs
    other = GPT2Model(GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0))
    other.save_pretrained(tmp_path / "other")
    assert main(["lora", "analyze", str(base_dir), str(tmp_path / "other")]) == 1
    assert "different architectures" in capsys.readouterr().err
    assert main(["lora", "extract", str(base_dir), str(base_dir), "-o", str(tmp_path / "x"), "--rank", "64"]) == 1
    assert "exceeds min(out, in)" in capsys.readouterr().err


def test_extract_refuses_an_existing_output_unless_overwrite(model_dirs, tmp_path, capsys):
    base_dir, tuned_dir, _, _ = model_dirs
    out = tmp_path / "adapter"
    args = ["lora", "extract", str(base_dir), str(tuned_dir), "-o", str(out), "--no-progress"]
    assert main(args + ["--rank", "2"]) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args + ["--rank", "3"]) == 1
    assert f"{out} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == first
    assert main(args + ["--rank", "3", "--overwrite"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3


def test_shared_options_targets_error_svd_method_and_json_file(model_dirs, tmp_path, capsys):
    base_dir, tuned_dir, _, _ = model_dirs
    report_file = tmp_path / "report.json"
    assert main([
        "lora", "extract", str(base_dir), str(tuned_dir), "-o", str(tmp_path / "a"), "--error", "0.5",
        "--targets", "h.0.attn.c_attn", "h.1.mlp.c_fc", "--json", str(report_file),
    ]) == 0
    assert "h.0.attn.c_attn" in capsys.readouterr().out  # the table still goes to the terminal
    report = json.loads(report_file.read_text())
    assert report["rank"] == {"kind": "error_tol", "value": 0.5}
    assert [layer["name"] for layer in report["layers"]] == ["h.0.attn.c_attn", "h.1.mlp.c_fc"]
    assert main(["lora", "extract", str(base_dir), str(tuned_dir), "-o", str(tmp_path / "b"), "--rank", "2",
                 "--svd-method", "randomized", "--targets", r"h\.1\..*"]) == 0
    assert json.loads((tmp_path / "b" / "extraction_report.json").read_text())["svd_method"] == "randomized"
    assert main(["lora", "extract", str(base_dir), str(tuned_dir), "-o", str(tmp_path / "c"), "--rank", "2",
                 "--svd-method", "auto", "--lora-alpha", "4", "--targets", "c_attn", "--exclude", "h.0.attn.c_attn"]) == 0
    assert json.loads((tmp_path / "c" / "extraction_report.json").read_text())["svd_method"] == "auto"
    adapter = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == 4 and adapter["target_modules"] == ["h.1.attn.c_attn"]
    assert main(["lora", "analyze", str(base_dir), str(tuned_dir), "--ranks", "1", "3", "--json", str(tmp_path / "s.json")]) == 0
    assert list(json.loads((tmp_path / "s.json").read_text())["layers"][0]["rank_errors"]) == ["1", "3"]


def test_user_errors_end_without_a_traceback_and_before_any_work(model_dirs, tmp_path, capsys):
    base_dir, tuned_dir, _, _ = model_dirs
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["lora", "analyze", str(garbage), str(tuned_dir)]) == 1
    err = capsys.readouterr().err
    assert f"cannot load the base model {str(garbage)!r}" in err and "Traceback" not in err
    out = tmp_path / "never"
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("")
    assert main(["lora", "extract", str(base_dir), str(tuned_dir), "-o", str(out), "--json", str(not_a_folder / "r.json")]) == 1
    assert f"cannot write {not_a_folder / 'r.json'}" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("old, message", [
    (["--alpha", "4"], "unrecognized arguments: --alpha 4"),  # now --lora-alpha
    (["--svd-method", "gram"], "invalid choice: 'gram'"),  # an eigenvalue route of svdkit analyze, not an SVD method
])
def test_extract_refuses_the_earlier_options(model_dirs, tmp_path, capsys, old, message):
    base_dir, tuned_dir, _, _ = model_dirs
    with pytest.raises(SystemExit) as exit_info:
        main(["lora", "extract", str(base_dir), str(tuned_dir), "-o", str(tmp_path / "x"), *old])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
