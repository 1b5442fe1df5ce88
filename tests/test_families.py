"""Every causal-LM family svdkit is tested on: compressed at a random budget, the report's counts
are the model's, the budget holds within one rank step per layer, save -> load reproduces the
logits exactly, and a second run in a new process writes the same bytes (refit included)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CAUSAL_FAMILIES, tiny_causal_lm
from svdkit.compression import CompressConfig, compress, load_compressed, save_compressed

FAMILIES = sorted(CAUSAL_FAMILIES)


def _batches() -> list[torch.Tensor]:
    return [torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.floats(0.3, 0.9))
def test_a_family_compresses_within_its_budget_and_round_trips(family, budget, tmp_path_factory, one_thread):
    model = tiny_causal_lm(family)
    out, report = compress(model, CompressConfig(budget=budget), _batches())
    assert report.pipeline == "blocks"
    assert report.model_params_before == sum(p.numel() for p in model.parameters())
    assert report.model_params_after == sum(p.numel() for p in out.parameters())
    assert report.model_params_after == report.model_params_before - report.target_params_before + report.target_params_after
    one_rank_per_layer = sum((row.shape[0] + row.shape[1]) * row.groups for row in report.layers)
    target = budget * report.target_params_before
    assert target - one_rank_per_layer <= report.target_params_after <= target + 1e-6
    directory = tmp_path_factory.mktemp(family) / "c"
    save_compressed(out, directory, report=report)
    again = load_compressed(directory)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, out(ids).logits, rtol=0, atol=0)


_CONFIGS = {"budget": dict(budget=0.6), "refit": dict(method="whiten", rank=6, pipeline="model", refit=1)}
_HASHES = """
import hashlib, json, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from conftest import tiny_causal_lm
from test_families import FAMILIES, _CONFIGS, _batches, _digest
from svdkit.compression import CompressConfig, compress
print(json.dumps({f"{f}/{c}": _digest(compress(tiny_causal_lm(f), CompressConfig(**kw), _batches())[0])
                  for f in FAMILIES for c, kw in _CONFIGS.items()}))
"""


def _digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_a_second_run_in_a_new_process_gives_the_same_bytes(one_thread):
    here = {f"{f}/{c}": _digest(compress(tiny_causal_lm(f), CompressConfig(**kw), _batches())[0])
            for f in FAMILIES for c, kw in _CONFIGS.items()}
    again = {f"{f}/refit": _digest(compress(tiny_causal_lm(f), CompressConfig(**_CONFIGS["refit"]), _batches())[0]) for f in FAMILIES}
    assert all(again[key] == here[key] for key in again), "refit differs between two runs in one process"
    result = subprocess.run([sys.executable, "-c", _HASHES, str(Path(__file__).parent)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    there = json.loads(result.stdout.strip().splitlines()[-1])
    assert there == here
