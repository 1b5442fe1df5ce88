"""CUDA paths: every result computed on the GPU matches the same computation on the CPU.

Skipped without a GPU; ``python -m pytest -q tests/test_cuda.py`` is the one script to run the
day a GPU is there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from svdkit.compression import CompressConfig, compress, load_compressed, save_compressed
from svdkit.linalg import randomized_svd, svd, svdvals, truncated_svd

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


def test_half_precision_batches_match_cpu():
    A = decaying(64, 48, "cuda").half().expand(3, 64, 48)
    U, S, Vh = svd(A)
    assert U.dtype == torch.float16 and U.shape == (3, 64, 48) and U.is_cuda
    reference = svdvals(A.float().cpu())
    torch.testing.assert_close(S.float().cpu(), reference, rtol=2e-3, atol=2e-3)


def test_randomized_svd_matches_cpu_for_a_seed():
    A = decaying(2048, 1024, "cuda")
    U, S, Vh = randomized_svd(A, 32, seed=3)
    assert U.is_cuda
    Uc, Sc, Vhc = randomized_svd(A.cpu(), 32, seed=3)
    torch.testing.assert_close(S.cpu(), Sc, rtol=1e-3, atol=1e-6)
    # Sign-fixed: the leading (well separated) vectors agree across devices.
    torch.testing.assert_close(U[:, :8].cpu(), Uc[:, :8], rtol=1e-2, atol=1e-3)
    _, stats = truncated_svd(A, 32, svd_method="randomized", seed=3)
    _, cpu_stats = truncated_svd(A.cpu(), 32, svd_method="randomized", seed=3)
    assert stats.relative_error == pytest.approx(cpu_stats.relative_error, rel=1e-3)


def _cnn(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10),
    ).to(device)


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten", "fisher"])
def test_compression_on_cuda_matches_cpu(method):
    batches = [torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    config = CompressConfig(method=method, budget=0.5)
    gpu, gpu_report = compress(_cnn("cuda"), config, [b.cuda() for b in batches])
    cpu, cpu_report = compress(_cnn("cpu"), config, batches)
    assert all(p.is_cuda for p in gpu.parameters())
    assert [r.rank for r in gpu_report.layers] == [r.rank for r in cpu_report.layers]
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-3, atol=1e-4)


def test_refit_heal_and_save_load_on_cuda(tmp_path):
    model = _cnn("cuda")
    batches = [torch.randn(16, 3, 16, 16, device="cuda") for _ in range(4)]
    x = torch.randn(4, 3, 16, 16, device="cuda")
    out, _ = compress(model, CompressConfig(method="fisher", budget=0.5, refit=1, layerwise_distill_steps=3), batches)
    assert all(p.is_cuda for p in out.parameters())
    save_compressed(out, tmp_path / "c")
    again = load_compressed(tmp_path / "c", base=copy.deepcopy(model))
    torch.testing.assert_close(again(x), out(x))


def test_block_pipeline_visits_the_gpu_and_matches_the_cpu(make_decoder):
    """A model kept on the CPU, each block computed on the GPU, equals the CPU-only run."""
    model = make_decoder("llama", causal=True, layers=3)
    batches = list(torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1)).split(2))
    config = dict(method="fisher", budget=0.6, pipeline="blocks")
    on_gpu, gpu_report = compress(model, CompressConfig(**config, device="cuda"), batches)
    on_cpu, cpu_report = compress(model, CompressConfig(**config), batches)
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())  # blocks went back where they were
    assert [r.rank for r in gpu_report.layers] == [r.rank for r in cpu_report.layers]
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(ids).logits, on_cpu(ids).logits, rtol=1e-3, atol=1e-3)


def test_lora_pissa_on_cuda_matches_cpu():
    from svdkit.lora import add_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 64))
    x = torch.randn(8, 256)
    kwargs = dict(r=8, init_lora_weights="pissa", svd_method="exact")
    gpu = add_lora(copy.deepcopy(model).cuda(), None, **kwargs)
    cpu = add_lora(model, None, **kwargs)
    assert all(p.is_cuda for p in gpu.parameters())
    torch.testing.assert_close(gpu(x.cuda()).cpu(), model(x), rtol=1e-4, atol=1e-4)  # outputs unchanged at init
    for (_, a), (_, b) in zip(gpu.named_parameters(), cpu.named_parameters()):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-3, atol=1e-4)


def test_weight_analysis_on_cuda_matches_cpu():
    from svdkit.analysis import analyze_weights

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 128))
    gpu = analyze_weights(copy.deepcopy(model).cuda())
    cpu = analyze_weights(model)
    assert gpu.names == cpu.names
    for g, c in zip(gpu, cpu):
        for column in ("sigma_max", "stable_rank", "log_norm", "alpha"):
            assert g[column] == pytest.approx(c[column], rel=1e-4), column


def test_spectral_tracker_on_cuda_matches_exact_values():
    from svdkit.analysis import SpectralTracker

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).cuda()
    tracker = SpectralTracker(model, every=1, mode="full")
    tracker.step()
    last = tracker.history.last()
    for name, layer in (("0", model[0]), ("2", model[2])):
        exact = torch.linalg.svdvals(layer.weight.detach().double().cpu())
        assert last[name]["sigma_max"] == pytest.approx(float(exact[0]), rel=1e-5)
        assert last[name]["stable_rank"] == pytest.approx(float((exact ** 2).sum() / exact[0] ** 2), rel=1e-5)
