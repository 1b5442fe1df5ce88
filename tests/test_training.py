"""SpectralTracker, its sinks and its attachments; TrajectoryRecorder; the figures; the example."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

from svdkit.analysis.training import (
    FAST_METRICS,
    METRICS,
    CSVSink,
    SpectralTracker,
    TensorBoardSink,
    TrackerHistory,
    TrajectoryRecorder,
    read_tracker_csv,
    trainer_callback,
)
from svdkit.linalg import (
    condition_number,
    effective_rank,
    energy_rank,
    frobenius_norm,
    nuclear_norm,
    spectral_norm,
    stable_rank,
    svdvals,
)
from svdkit.views import weight_matrix

# Tiny models: one thread avoids OpenMP stalls when the cores are shared (and is as fast); the
# shared fixture restores the caller's thread count afterwards.
pytestmark = pytest.mark.usefixtures("one_thread")


DIRECT = {
    "sigma_max": spectral_norm,
    "frobenius_norm": frobenius_norm,
    "stable_rank": stable_rank,
    "nuclear_norm": nuclear_norm,
    "condition_number": condition_number,
    "effective_rank": effective_rank,
}


def exact(module: nn.Module, metric: str) -> float:
    """The metric computed directly from the layer's weight matrix in float64."""
    return DIRECT[metric](svdvals(weight_matrix(module).detach().double()))


class Mixed(nn.Module):
    """Layers of many shapes: wide and tall Linear, Conv2d, two equal shapes, a large one."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.conv = nn.Conv2d(3, 8, 3)
        self.wide = nn.Linear(40, 7)
        self.tall = nn.Linear(7, 40)
        self.twin_a = nn.Linear(12, 12)
        self.twin_b = nn.Linear(12, 12)
        self.big = nn.Linear(256, 160)

    def forward(self, x):  # pragma: no cover - the tracker reads weights only
        return x


def spiked(m: int, n: int, top: float = 5.0, seed: int = 0) -> torch.Tensor:
    """A matrix with singular values (top, 2.5, 1, 0.9, ..., ) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = torch.linspace(1.0, 0.1, min(m, n))
    s[0], s[1] = top, top / 2
    return U @ torch.diag(s) @ V.T


def set_spiked(model: nn.Module) -> None:
    with torch.no_grad():
        for i, module in enumerate(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding))):
            W = weight_matrix(module)
            module.weight.copy_(spiked(*W.shape, seed=i).reshape(module.weight.shape))


# -- values equal direct computations ------------------------------------------------------------


def test_full_mode_equals_direct_computation_for_every_layer_kind():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Mixed()
    model.gpt = transformers.pytorch_utils.Conv1D(24, 12)  # stored (in, out): the view transposes it
    tracker = SpectralTracker(model, mode="full", include_embeddings=True)
    assert set(tracker.layer_names) == {"embed", "conv", "wide", "tall", "twin_a", "twin_b", "big", "gpt"}
    tracker.record()
    last = tracker.history.last()
    for name in tracker.layer_names:
        module = model.get_submodule(name)
        for metric in METRICS:
            assert last[name][metric] == pytest.approx(exact(module, metric), rel=2e-5), (name, metric)


def test_fast_mode_equals_direct_computation_after_warmup():
    torch.manual_seed(0)
    model = Mixed()
    set_spiked(model)
    tracker = SpectralTracker(model, mode="fast", include_embeddings=True)
    tracker.record()
    last = tracker.history.last()
    for name in tracker.layer_names:
        module = model.get_submodule(name)
        sigma = exact(module, "sigma_max")
        assert last[name]["frobenius_norm"] == pytest.approx(exact(module, "frobenius_norm"), rel=1e-5)
        assert last[name]["sigma_max"] == pytest.approx(sigma, rel=1e-4)
        assert last[name]["sigma_max"] <= sigma * (1 + 1e-5)  # power iteration bounds from below
        assert last[name]["stable_rank"] == pytest.approx(last[name]["frobenius_norm"] ** 2 / last[name]["sigma_max"] ** 2)


def digits_training(steps: int, tracker_kwargs: dict, seed: int = 0):
    """Train the example's CNN on real digits for ``steps`` Adam steps with a tracker attached."""
    from svdkit.examples.train_digits import DigitsCNN, load_digits_split

    X, y, _, _ = load_digits_split(seed=seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    tracker = SpectralTracker(model, **tracker_kwargs).attach(optimizer)
    g = torch.Generator().manual_seed(seed)
    exact_sigmas = []
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        exact_sigmas.append([exact(model.get_submodule(n), "sigma_max") for n in tracker.layer_names])
    return model, optimizer, tracker, np.array(exact_sigmas)


def test_fast_sigma_tracks_exact_within_one_percent_during_training():
    _, _, tracker, exact_sigmas = digits_training(40, {"mode": "fast"})
    history = tracker.history
    assert list(history.steps) == list(range(41))
    estimate = history.values("sigma_max")[1:]
    error = np.abs(estimate - exact_sigmas) / exact_sigmas
    # Adam's first steps on a fresh network reshape the spectrum faster than two warm-started
    # iterations follow; from step 5 on the estimate is within 1 %.
    assert error[:5].max() < 0.05, error[:5].max(axis=1)
    assert error[5:].max() < 0.01, error[5:].max(axis=0)


def test_fast_mode_with_full_every_fills_slow_metrics_on_their_cadence():
    model, _, tracker, exact_sigmas = digits_training(12, {"mode": "fast", "full_every": 5})
    history = tracker.history
    assert history.metrics == list(METRICS)
    nuclear = history.values("nuclear_norm")
    computed = ~np.isnan(nuclear).any(axis=1)
    assert list(history.steps[computed]) == [0, 5, 10]
    assert not np.isnan(history.values("sigma_max")).any()
    # The last full step is exact.
    steps, values = history.series("fc1", "condition_number")
    assert steps[-1] == 10 and values[-1] > 1


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [0, -3, 1.5, True])
def test_every_must_be_a_positive_int(every):
    with pytest.raises(ValueError, match=f"every must be an int >= 1, got {every!r}"):
        SpectralTracker(Mixed(), every=every)
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        TrajectoryRecorder(Mixed(), every=every)


def test_target_modules_matching_nothing_name_the_selection():
    with pytest.raises(ValueError, match=r"target_modules=\['attention'\].*select no layer of Mixed.*'wide'"):
        SpectralTracker(Mixed(), target_modules=["attention"])
    with pytest.raises(ValueError, match=r"target_modules='nope\.\*'"):
        SpectralTracker(Mixed(), target_modules="nope.*")
    with pytest.raises(ValueError, match=r"exclude_modules=\['wide'\]"):
        SpectralTracker(Mixed(), target_modules=["wide"], exclude_modules=["wide"])


def test_fast_mode_refuses_full_spectrum_metrics_without_full_every():
    with pytest.raises(ValueError, match=r"\['effective_rank'\] need every singular value.*full_every"):
        SpectralTracker(Mixed(), metrics=("sigma_max", "effective_rank"), mode="fast")
    tracker = SpectralTracker(Mixed(), metrics=("effective_rank",), mode="fast", full_every=10)
    assert tracker.metrics == ("effective_rank",)
    assert [tracker.step() for _ in range(20)].count(True) == 2  # only the full-spectrum cadence
    assert list(tracker.history.steps) == [10, 20] and not np.isnan(tracker.history.array()).any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "exact"}, "mode must be 'fast' or 'full', got 'exact'"),
        ({"metrics": ("sigma_max", "alpha")}, r"unknown metrics \['alpha'\]"),
        ({"mode": "full", "full_every": 5}, "full_every=5 is for mode='fast'"),
        ({"power_iters": 0}, "power_iters must be an int >= 1, got 0"),
        ({"full_every": 0}, "full_every must be an int >= 1, got 0"),
    ],
)
def test_bad_tracker_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpectralTracker(Mixed(), **kwargs)


def test_recorder_bad_input():
    with pytest.raises(ValueError, match="max_snapshots must be >= 2"):
        TrajectoryRecorder(Mixed(), max_snapshots=1)
    with pytest.raises(ValueError, match="params is empty"):
        TrajectoryRecorder([])
    with pytest.raises(ValueError, match="needs at least 2 snapshots, have 0"):
        TrajectoryRecorder(Mixed()).analyze()


# -- cadence, edge cases --------------------------------------------------------------------------


def test_cadence_counts_steps():
    tracker = SpectralTracker(Mixed(), every=3)
    recorded = [tracker.step() for _ in range(10)]
    assert recorded == [False, False, True] * 3 + [False]
    assert list(tracker.history.steps) == [3, 6, 9]
    assert tracker.step(step=12) and tracker.step_count == 12
    full = SpectralTracker(Mixed(), every=4, mode="full")
    for _ in range(9):
        full.step()
    assert list(full.history.steps) == [4, 8]


def test_zero_matrix_reads_zero_then_recovers_at_once():
    model = nn.Sequential(nn.Linear(20, 8), nn.Linear(8, 30))
    with torch.no_grad():
        model[1].weight.zero_()  # a zero-initialised LoRA B, say
    tracker = SpectralTracker(model, flush_every=1)
    tracker.record()
    assert tracker.history.last()["1"] == {"sigma_max": 0.0, "frobenius_norm": 0.0, "stable_rank": 0.0}
    with torch.no_grad():
        model[1].weight.copy_(spiked(30, 8))
    for _ in range(4):  # the kept-alive start block converges as from a fresh start
        tracker.step()
    assert tracker.history.last()["1"]["sigma_max"] == pytest.approx(5.0, rel=1e-4)


def test_nan_weights_give_nan_and_the_estimate_restarts_after():
    model = nn.Sequential(nn.Linear(20, 8))
    tracker = SpectralTracker(model, flush_every=1)
    tracker.record()
    saved = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    tracker.step()
    assert np.isnan(tracker.history.array()[-1]).all()
    with torch.no_grad():
        model[0].weight.copy_(saved)
    tracker.step()
    assert tracker.history.last()["0"]["sigma_max"] == pytest.approx(exact(model[0], "sigma_max"), rel=1e-4)


def test_replaced_weight_is_picked_up():
    model = nn.Sequential(nn.Linear(10, 10))
    tracker = SpectralTracker(model, mode="fast", flush_every=1)
    tracker.record()
    model[0].weight = nn.Parameter(spiked(10, 10, top=9.0))
    tracker.step()
    assert tracker.history.last()["0"]["sigma_max"] == pytest.approx(9.0, rel=1e-4)


def test_half_precision_weights_are_tracked_in_float32():
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16)).to(torch.bfloat16)
    tracker = SpectralTracker(model, mode="fast")
    tracker.record()
    for name, values in tracker.history.last().items():
        W = weight_matrix(model.get_submodule(name)).detach().float()
        assert values["frobenius_norm"] == pytest.approx(float(torch.linalg.norm(W)), rel=1e-5)


# -- attaching and detaching ------------------------------------------------------------------------


def test_optimizer_hook_attaches_and_detaches_cleanly():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def train_step():
        loss = model(torch.randn(8, 6)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    tracker = SpectralTracker(model, every=2).attach(optimizer)
    recorder = TrajectoryRecorder(model, every=2).attach(optimizer)
    assert tracker.attached and recorder.attached
    for _ in range(5):
        train_step()
    assert list(tracker.history.steps) == [0, 2, 4]
    assert recorder.snapshots()[0] == [0, 2, 4]
    assert list(recorder.gradient_overlaps()[0]) == [2, 4]  # the gradient at step 0 has no update yet
    with pytest.raises(RuntimeError, match="already attached"):
        tracker.attach(optimizer)
    tracker.detach()
    recorder.detach()
    assert not tracker.attached and not recorder.attached
    for _ in range(4):
        train_step()
    # Detached: four more optimizer steps record nothing, snapshot nothing, measure no gradient.
    assert list(tracker.history.steps) == [0, 2, 4] and len(recorder) == 3
    assert list(recorder.gradient_overlaps()[0]) == [2, 4]
    with SpectralTracker(model).attach(optimizer) as scoped:
        train_step()
    assert not scoped.attached and list(scoped.history.steps) == [0, 1]
    train_step()
    assert list(scoped.history.steps) == [0, 1]  # the context manager removed its hook


def test_trainer_callback_in_a_real_trainer_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids} for _ in range(32)]
    tracker = SpectralTracker(model, mode="full", every=2)
    recorder = TrajectoryRecorder(model, every=1)
    callback = trainer_callback(tracker, recorder)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    assert tracker.layer_names == [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert list(tracker.history.steps) == [0, 2, 4]
    last = tracker.history.last()["transformer.h.0.mlp.c_fc"]
    assert last["nuclear_norm"] == pytest.approx(exact(model.transformer.h[0].mlp.c_fc, "nuclear_norm"), rel=1e-5)
    steps, overlaps = recorder.gradient_overlaps()
    assert list(recorder.snapshots()[0]) == [0, 1, 2, 3, 4] and list(steps) == [1, 2, 3]
    assert ((overlaps >= 0) & (overlaps <= 1 + 1e-6)).all()
    trainer.remove_callback(callback)
    trainer.args.max_steps = 6
    trainer.train()
    assert list(tracker.history.steps) == [0, 2, 4] and len(recorder) == 5
    with pytest.raises(TypeError, match="got Linear, which lacks train_begin, pre_optimizer_step"):
        trainer_callback(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least one"):
        trainer_callback()


# -- sinks ----------------------------------------------------------------------------------------------


def test_csv_sink_round_trips_with_empty_cells(tmp_path):
    path = tmp_path / "deep" / "spectral.csv"
    model, _, tracker, _ = digits_training(6, {"mode": "fast", "full_every": 3, "sinks": [CSVSink(path)], "flush_every": 4})
    tracker.close()
    history = tracker.history
    back = read_tracker_csv(path)
    assert back.layers == history.layers and back.metrics == history.metrics
    np.testing.assert_array_equal(back.steps, history.steps)
    np.testing.assert_allclose(back.array(), history.array(), rtol=1e-15)
    lines = path.read_text().splitlines()
    assert lines[0] == "step,layer," + ",".join(METRICS)
    assert lines[5].startswith("1,conv1,") and lines[5].endswith(",,,")  # step 1: no full-spectrum values
    again = TrackerHistory.from_csv(history.to_csv(tmp_path / "again.csv"))
    np.testing.assert_allclose(again.array(), history.array())
    with pytest.raises(ValueError, match="is closed"):
        tracker.sinks[0].write(0, ["a"], ["sigma_max"], np.ones((1, 1)))
    with pytest.raises(ValueError, match="not a tracker CSV"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        read_tracker_csv(tmp_path / "bad.csv")


def test_tensorboard_sink_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    tracker = SpectralTracker(nn.Sequential(nn.Linear(4, 3)), sinks=[sink])
    tracker.record()
    tracker.step()
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"spectral/{m}/0" for m in FAST_METRICS}
    scalars = events.Scalars("spectral/sigma_max/0")
    assert [e.step for e in scalars] == [0, 1]
    assert scalars[-1].value == pytest.approx(tracker.history.last()["0"]["sigma_max"], rel=1e-6)


def test_tensorboard_sink_without_tensorboard_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install tensorboard"):
        TensorBoardSink("unused")


# -- trajectory -------------------------------------------------------------------------------------------


def test_trajectory_svd_equals_numpy_on_exact_snapshots():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    recorder = TrajectoryRecorder(model, max_snapshots=10)
    params = list(model.parameters())
    recorder.snapshot()
    flat = [torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy()]
    for _ in range(6):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.1)
        recorder.step()
        flat.append(torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy())
    analysis = recorder.analyze()
    D = np.diff(np.array(flat, dtype=np.float64), axis=0)
    S = np.linalg.svd(D, compute_uv=False)
    np.testing.assert_allclose(analysis.singular_values, S, rtol=1e-5)
    assert analysis.dims_90 == energy_rank(S, 0.9) and analysis.dims_99 == energy_rank(S, 0.99)
    assert analysis.path_length == pytest.approx(np.linalg.norm(D, axis=1).sum(), rel=1e-5)
    assert analysis.steps == tuple(range(7)) and not analysis.projected
    assert analysis.to_dict()["dims_99"] == analysis.dims_99


@pytest.mark.parametrize("max_dim", [10_000, 500])  # exact, then sketched
def test_trajectory_in_a_low_dimensional_subspace(max_dim):
    torch.manual_seed(0)
    theta = nn.Parameter(torch.zeros(3000))
    recorder = TrajectoryRecorder([theta], max_snapshots=30, max_dim=max_dim, top_k=3)
    assert recorder.projected == (max_dim < 3000)
    basis = torch.linalg.qr(torch.randn(3000, 3))[0]
    recorder.snapshot()
    for _ in range(20):
        with torch.no_grad():
            theta.add_(basis @ (torch.randn(3) * torch.tensor([1.0, 0.3, 0.1])))
        recorder.step()
    analysis = recorder.analyze()
    assert analysis.dims_99 <= 3 and analysis.effective_directions < 3
    assert np.all(analysis.singular_values[3:] < 1e-4 * analysis.singular_values[0])
    theta.grad = basis @ torch.randn(3)  # a gradient inside the update subspace
    assert float(recorder.record_gradient()) == pytest.approx(1.0, abs=1e-4)
    if not recorder.projected:
        theta.grad = torch.randn(3000)
        theta.grad -= basis @ (basis.T @ theta.grad)  # orthogonal to it
        assert float(recorder.record_gradient()) == pytest.approx(0.0, abs=1e-8)


def test_recorder_memory_stays_within_its_bound():
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 50))  # 15,150 parameters
    recorder = TrajectoryRecorder(model, max_snapshots=8, max_dim=1024, top_k=4)
    assert recorder.projected and recorder.dim == 1024
    bound = recorder.memory_bound_bytes
    assert bound == 4 * 1024 * (8 + 4) + 5 * 15_150
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    recorder.attach(optimizer)
    for _ in range(40):
        loss = model(torch.randn(16, 100)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert recorder.memory_bytes() <= bound
    assert len(recorder) == 8 and recorder.snapshots()[0] == list(range(33, 41))
    assert recorder.snapshots()[1].shape == (8, 1024)
    assert list(recorder.gradient_overlaps()[0]) == list(range(1, 40))  # step 0 has no update to compare with
    analysis = recorder.analyze()
    assert analysis.singular_values.shape == (7,) and analysis.steps == tuple(range(33, 41))


# -- figures and example -----------------------------------------------------------------------------------


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from svdkit.report.training_plots import plot_spectral_history, plot_trajectory

    _, optimizer, tracker, _ = digits_training(6, {"mode": "full", "sinks": [CSVSink(tmp_path / "s.csv")]})
    tracker.close()
    fig = plot_spectral_history(tmp_path / "s.csv", tmp_path / "spectral.png")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == len(METRICS)
    recorder = TrajectoryRecorder([torch.nn.Parameter(torch.zeros(50))])
    for step in range(5):
        recorder.params[0].data.add_(torch.randn(50))
        recorder.snapshot(step)
    plot_trajectory(recorder.analyze(), tmp_path / "trajectory.png")
    for name in ("spectral.png", "trajectory.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(KeyError, match="no layer 'nope'"):
        plot_spectral_history(tracker.history, layers=["nope"])


def test_example_writes_csv_and_figures(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from svdkit.examples.train_digits import main

    assert main(["--track", str(tmp_path), "--epochs", "1", "--full-every", "10", "--snapshot-every", "2"]) == 0
    for name in ("spectral.csv", "spectral.png", "trajectory.png", "trajectory.json"):
        assert (tmp_path / name).stat().st_size > 0
    history = read_tracker_csv(tmp_path / "spectral.csv")
    assert history.layers == ["conv1", "conv2", "fc1", "fc2"] and len(history) == 24  # steps 0..23
    assert "test accuracy" in capsys.readouterr().out


# -- devices and cost ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensors_stay_on_the_device():
    model = Mixed().cuda()
    set_spiked(model)
    tracker = SpectralTracker(model, mode="full", flush_every=10)
    tracker.record()
    tracker.step()
    cpu = SpectralTracker(copy.deepcopy(model).cpu(), mode="full")
    cpu.record()
    cpu.step()
    np.testing.assert_allclose(tracker.history.array(), cpu.history.array(), rtol=1e-4)
    fast = SpectralTracker(model, mode="fast")
    fast.record()
    np.testing.assert_allclose(fast.history.values("sigma_max")[0], cpu.history.values("sigma_max")[0], rtol=1e-4)
    recorder = TrajectoryRecorder(model, max_dim=1000)
    recorder.snapshot()
    assert recorder.snapshots()[1].is_cuda


# -- package structure ---------------------------------------------------------------------------------------


def test_training_subpackage_imports_point_one_way():
    """No module of svdkit.analysis.training imports one that imports it back (even lazily)."""
    import ast
    import pathlib

    import svdkit.analysis.training as package

    root = pathlib.Path(package.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
        graph[path.stem] = deps - {path.stem}
    assert set(graph) >= {"__init__", "callbacks", "sinks", "spectra", "tracker", "trajectory"}

    def reaches(start, goal, seen=()):
        return any(dep == goal or (dep not in seen and reaches(dep, goal, (*seen, dep))) for dep in graph.get(start, ()))

    cycles = [name for name in graph if reaches(name, name)]
    assert not cycles, {name: graph[name] for name in cycles}
    import svdkit.analysis as analysis

    for name in ("SpectralTracker", "TrajectoryRecorder", "TrackerHistory", "CSVSink", "TensorBoardSink", "trainer_callback"):
        assert getattr(analysis, name) is getattr(package, name)
