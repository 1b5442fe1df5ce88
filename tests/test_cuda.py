"""CUDA paths: tensors stay on the GPU and results agree with the CPU. Skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from svdkit.compression import CompressConfig, compress, load_compressed, save_compressed
from svdkit.layers import LowRankConv2d, LowRankLinear
from svdkit.linalg import ParamRatio, randomized_svd, svd, svdvals, truncated_svd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def decaying(m: int, n: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -0.7
    return ((U * s) @ V.T).float().to(device)


@pytest.mark.parametrize("driver", [None, "gesvd", "gesvdj", "gesvda"])
def test_svd_drivers_stay_on_cuda_and_match_cpu(driver):
    A = decaying(300, 200, "cuda")
    U, S, Vh = svd(A, driver=driver)
    assert U.is_cuda and S.is_cuda and Vh.is_cuda
    torch.testing.assert_close(S.cpu(), svdvals(A.cpu()), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((U * S) @ Vh, A, rtol=1e-3, atol=1e-5)


def test_half_precision_and_batches_on_cuda():
    A = decaying(64, 48, "cuda").half().expand(3, 64, 48)
    U, S, Vh = svd(A)
    assert U.dtype == torch.float16 and U.shape == (3, 64, 48) and U.is_cuda


def test_randomized_svd_stays_on_cuda_and_matches_cpu_for_a_seed():
    A = decaying(2048, 1024, "cuda")
    U, S, Vh = randomized_svd(A, 32, seed=3)
    assert U.is_cuda
    Uc, Sc, Vhc = randomized_svd(A.cpu(), 32, seed=3)
    torch.testing.assert_close(S.cpu(), Sc, rtol=1e-3, atol=1e-6)
    # Sign-fixed: the leading (well separated) vectors agree across devices.
    torch.testing.assert_close(U[:, :8].cpu(), Uc[:, :8], rtol=1e-2, atol=1e-3)
    _, stats = truncated_svd(A, 32, svd_method="randomized")
    assert 0 < stats.relative_error < 1


def test_compress_a_cuda_model_with_every_method_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
    ).cuda()
    batches = [torch.randn(16, 3, 16, 16, device="cuda") for _ in range(4)]
    x = torch.randn(4, 3, 16, 16, device="cuda")
    for method in ("svd", "asvd", "whiten", "fisher"):
        out, report = compress(model, CompressConfig(method=method, rank=ParamRatio(0.5)), batches)
        assert all(p.is_cuda for p in out.parameters())
        assert any(isinstance(m, (LowRankLinear, LowRankConv2d)) for m in out.modules())
        assert out(x).shape == (4, 10)
    out, _ = compress(model, CompressConfig(method="fisher", budget=0.5, refit=1, heal_steps=3), batches)
    assert all(p.is_cuda for p in out.parameters())
    save_compressed(out, tmp_path / "c")
    again = load_compressed(tmp_path / "c", base=copy.deepcopy(model))
    torch.testing.assert_close(again(x), out(x))


def test_lora_pissa_on_cuda_keeps_outputs():
    from svdkit.lora import add_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 64)).cuda()
    x = torch.randn(8, 256, device="cuda")
    expected = model(x)
    adapted = add_lora(copy.deepcopy(model), None, rank=8, init="pissa", svd="randomized")
    assert all(p.is_cuda for p in adapted.parameters())
    torch.testing.assert_close(adapted(x), expected, rtol=1e-4, atol=1e-4)


def test_weight_analysis_of_a_cuda_model():
    from svdkit.analysis import analyze_weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 128)).cuda()
    table = analyze_weights(model)
    rows = list(table)
    assert len(rows) == 2
    S = torch.linalg.svdvals(model[0].weight.detach().double().cpu())
    first = rows[0] if not hasattr(rows[0], "keys") else rows[0]
    assert abs(first["sigma_max"] - float(S[0])) / float(S[0]) < 1e-4


def test_spectral_tracker_on_cuda():
    from svdkit.analysis import SpectralTracker

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).cuda()
    tracker = SpectralTracker(model, every=1, mode="full")
    tracker.step()
    assert len(tracker.history) > 0
