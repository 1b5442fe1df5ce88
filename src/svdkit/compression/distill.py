"""Heal a compressed causal language model: distillation from its dense source on token windows.

Each step runs the dense model (the teacher) and the compressed model (the student) on a batch of
token windows and lowers, over the parameters of the factorized layers only (the factors and
their biases), the KL divergence of the student's next-token distribution from the teacher's,
``sum_v p_teacher(v) (log p_teacher(v) - log p_student(v))`` averaged over the tokens (optionally
plus ``ce_weight`` times the next-token loss on the true tokens). Every other parameter (the
embedding, the norms, layers kept dense) stays as it is.

- **Memory**: windows run one at a time (the gradients of a batch are accumulated), so memory holds
  one window's logits (``seq_len x vocab``) for each model, whatever the batch.
- **Held out**: the last ``held_out`` windows are never trained on; their mean KL is measured
  before the first step and after the last (:class:`HealResult`).
- **Text the teacher writes** (``generated_windows``): windows sampled from the dense model itself
  (:mod:`svdkit.sampling`) join the given training windows, so that healing also teaches the
  student what the teacher does on text unlike the calibration (LLM-QAT's data-free
  distillation). They are sampled once, before the first step, and kept in the state file.
- **Resumable**: every ``checkpoint_every`` steps (and at the end) the trained parameters, Adam's
  moments, the step and the losses are written atomically to a state file (safetensors with a
  JSON header; never a pickle), and once before the first step. A run started again with the same
  state file, config, windows and model continues where it stopped and ends with the same
  parameters as an uninterrupted run: the windows of step ``s`` and its learning rate depend on
  ``s`` and the seed only.

Costs: a step reads ``batch_windows * seq_len`` tokens through both models and back through the
student (about four forward passes' work); sampling a window costs one teacher forward per token
(with its key/value cache); :class:`HealResult` records the tokens and seconds of both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..eval import model_logits
from ..layers.lowrank import low_rank_types
from ..progress import ProgressLike, track
from ..sampling import sample_windows, start_token

__all__ = ["HealConfig", "HealResult", "check_heal_source", "heal_language_model", "healed_parameters", "mean_kl"]

STATE_FORMAT = 2


@dataclass(frozen=True)
class HealConfig:
    """How to heal a compressed causal LM by distillation (see the module docstring).

    Parameters
    ----------
    steps : int
        Optimizer steps (Adam).
    lr : float
        Peak learning rate: linear warm-up over the first 5 % of the steps, then a cosine decay to a
        tenth of it.
    batch_windows : int
        Windows per step (run one at a time, their gradients summed).
    held_out : int
        Windows, taken from the end of the given windows, that are never trained on and measure
        the KL before and after.
    ce_weight : float
        Weight of the next-token loss (the true tokens) beside the KL; 0: distillation alone.
    temperature : float
        Softens both distributions (the KL is multiplied by ``temperature**2``, as usual).
    max_grad_norm : float
        Gradients are clipped to this global norm (0: no clipping).
    checkpoint_every : int
        Write the state file every this many steps (with a state file).
    seed : int
        Order of the training windows, and the sampling of the generated ones.
    generated_windows : int
        Windows sampled from the teacher (nucleus 0.95, from its start-of-text token) added to
        the training windows; 0: none.
    """

    steps: int = 100
    lr: float = 5e-5
    batch_windows: int = 4
    held_out: int = 8
    ce_weight: float = 0.0
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 10
    seed: int = 0
    generated_windows: int = 0

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_windows", 1), ("held_out", 1), ("checkpoint_every", 1), ("seed", 0),
                          ("generated_windows", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"HealConfig.{name}: expected an int >= {low}, got {value!r}")
        for name, positive in (("lr", True), ("temperature", True), ("ce_weight", False), ("max_grad_norm", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ValueError(f"HealConfig.{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class HealResult:
    """What a healing run did.

    Attributes
    ----------
    steps : int
        Steps done in total (a resumed run counts those before it).
    resumed_from : int
        The step the run started at (0: a fresh run).
    train_windows, held_out_windows : int
        ``train_windows`` counts the generated ones.
    generated_windows : int
    generation_seconds : float
        Wall time of sampling the generated windows.
    tokens : int
        Training tokens read by the student in total (``steps * batch_windows * seq_len``).
    seconds : float
        Wall time of the whole run, sampling included; a resumed run adds the time its state file
        recorded (up to its last checkpoint: the steps redone after it count once).
    losses : list of float
        The training loss of every step.
    held_out_kl_before, held_out_kl_after : float
        Mean per-token KL (nats) of the student from the teacher on the held-out windows, before
        healing (from the state file, for a resumed run) and after.
    """

    steps: int = 0
    resumed_from: int = 0
    train_windows: int = 0
    held_out_windows: int = 0
    generated_windows: int = 0
    generation_seconds: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    held_out_kl_before: float = float("nan")
    held_out_kl_after: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        generated = f", {self.generated_windows} of {self.train_windows} windows written by the dense model" if self.generated_windows else ""
        return (f"healed {self.steps} steps ({self.tokens:,} tokens, {self.seconds:.0f} s{generated}): held-out KL "
                f"{self.held_out_kl_before:.4f} -> {self.held_out_kl_after:.4f} nats/token")


def healed_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters healing trains: those of every factorized layer (each once, by first name)."""
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if isinstance(module, low_rank_types()):
            for pname, p in module.named_parameters(prefix=name):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((pname, p))
    return out


def _window_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), logits of shape (L, V)."""
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature ** 2


@torch.no_grad()
def mean_kl(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, *, temperature: float = 1.0) -> float:
    """Mean per-token KL divergence (nats) of ``student``'s next-token distribution from
    ``teacher``'s over ``windows`` (N, L) of token ids, one window at a time."""
    total = 0.0
    for row in windows:
        ids = row.unsqueeze(0)
        total += float(_window_kl(model_logits(student, ids)[0], model_logits(teacher, ids)[0], temperature))
    return total / max(len(windows), 1)


def _teacher_windows(teacher: nn.Module, config: HealConfig, seq_len: int, progress: ProgressLike) -> torch.Tensor:
    """``config.generated_windows`` windows of ``seq_len`` tokens sampled from the teacher, (n, seq_len)."""
    if not config.generated_windows:
        return torch.zeros(0, seq_len, dtype=torch.int64)
    model_config = getattr(teacher, "config", None)
    if model_config is None:
        raise ValueError(f"generated_windows: the dense model ({type(teacher).__name__}) has no config naming the token its text "
                         "starts from (a transformers causal LM has one); heal on text windows alone")
    return sample_windows(teacher, config.generated_windows, seq_len, start=start_token(model_config), seed=config.seed, progress=progress)


def _learning_rate(config: HealConfig, step: int) -> float:
    """Linear warm-up over 5 % of the steps, then a cosine from ``lr`` down to ``lr / 10``."""
    warmup = max(1, round(0.05 * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch_rows(config: HealConfig, step: int, train: int) -> list[int]:
    """The training windows of ``step``: consecutive slices of one seeded permutation per epoch."""
    rows = []
    for k in range(step * config.batch_windows, (step + 1) * config.batch_windows):
        epoch, position = divmod(k, train)
        order = torch.randperm(train, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        rows.append(int(order[position]))
    return rows


def _fingerprint(windows: torch.Tensor, names: list[tuple[str, tuple[int, ...]]], config: HealConfig) -> str:
    """What a state file must have been written for: the windows, the trained tensors' names and
    shapes, and the config (all but ``checkpoint_every``)."""
    digest = hashlib.sha256()
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(json.dumps(names).encode())
    digest.update(json.dumps({k: v for k, v in config.to_dict().items() if k != "checkpoint_every"}, sort_keys=True).encode())
    return digest.hexdigest()


def _save_state(path: Path, params: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                generated: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {"generated": generated.contiguous()}
    for i, (_, p) in enumerate(params):
        tensors[f"param.{i}"] = p.detach().cpu().contiguous()
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"{key}.{i}"] = state[key].detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata={"svdkit_heal": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_state(path: Path, params: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
                fingerprint: str) -> tuple[dict[str, Any], torch.Tensor]:
    """The run's meta data and generated windows; the parameters and Adam's moments are restored in place."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("svdkit_heal", "null"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is not a healing state file svdkit can read ({type(exc).__name__}: {exc}); remove it to start afresh") from exc
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a healing state file of this svdkit (format {STATE_FORMAT}); remove it to start afresh")
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{path} was written for other windows, another model or another healing config: resume with the same model, "
            "calibration windows and options, or remove it to start afresh"
        )
    step = int(meta["step"])
    with torch.no_grad():
        for i, (_, p) in enumerate(params):
            p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
            if f"exp_avg.{i}" in tensors:
                optimizer.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": tensors[f"exp_avg.{i}"].to(p.device, p.dtype),
                    "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].to(p.device, p.dtype),
                }
    return meta, tensors["generated"]


def heal_language_model(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    config: HealConfig | None = None,
    *,
    state_path: str | os.PathLike | None = None,
    progress: ProgressLike = None,
) -> HealResult:
    """Distil ``student`` (a compressed causal LM, changed in place) toward ``teacher`` (its dense source).

    Parameters
    ----------
    student : nn.Module
        The compressed model; only the parameters of its factorized layers are trained.
    teacher : nn.Module
        The dense model it was compressed from (left unchanged; see :func:`check_heal_source`).
    windows : Tensor of shape (N, L), int64
        Token windows (:func:`svdkit.tokens.calibration_tokens`); the last ``config.held_out``
        are held out.
    config : HealConfig, optional
    state_path : path, optional
        The state file: resumed from when it exists, written every ``checkpoint_every`` steps
        and at the end. None: not resumable.
    progress : bool or callable

    Returns
    -------
    HealResult

    Raises
    ------
    ValueError
        No factorized layer, too few windows, or a state file written for another run.
    """
    config = config or HealConfig()
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.is_floating_point():
        raise ValueError(f"windows must be an (N, L) tensor of token ids, got {getattr(windows, 'shape', type(windows).__name__)}")
    if windows.shape[1] < 2:
        raise ValueError(f"healing needs windows of at least 2 tokens, got {windows.shape[1]}")
    if windows.shape[0] <= config.held_out:
        raise ValueError(f"{windows.shape[0]} windows leave none to train on after the {config.held_out} held out: pass more windows "
                         "or a smaller held_out")
    params = healed_parameters(student)
    if not params:
        raise ValueError("the student has no factorized layers to heal: compress it first (svdkit.compress)")
    train, held = windows[:-config.held_out], windows[-config.held_out:]
    names = [(name, tuple(p.shape)) for name, p in params]
    fingerprint = _fingerprint(windows, names, config)
    state = Path(state_path) if state_path is not None else None
    flags = {p: p.requires_grad for p in student.parameters()}
    teacher_flags = {p: p.requires_grad for p in teacher.parameters()}
    modes = student.training, teacher.training
    result = HealResult(held_out_windows=len(held))
    start, earlier = time.perf_counter(), 0.0  # earlier: the seconds a resumed run's state file recorded
    try:
        student.eval()
        teacher.eval()
        for p in student.parameters():
            p.requires_grad_(False)
        for p in teacher.parameters():
            p.requires_grad_(False)
        for _, p in params:
            p.requires_grad_(True)
        trained = [p for _, p in params]
        optimizer = torch.optim.Adam(trained, lr=config.lr)

        def save(step: int) -> None:
            if state is not None:
                _save_state(state, params, optimizer, {"format": STATE_FORMAT, "step": step, "losses": result.losses,
                                                       "held_out_kl_before": result.held_out_kl_before, "fingerprint": fingerprint,
                                                       "seconds": earlier + time.perf_counter() - start,
                                                       "generation_seconds": result.generation_seconds},
                            generated)

        if state is not None and state.exists():
            meta, generated = _load_state(state, params, optimizer, fingerprint)
            result.resumed_from = int(meta["step"])
            result.losses = list(meta["losses"])
            result.held_out_kl_before = float(meta["held_out_kl_before"])
            earlier, result.generation_seconds = float(meta["seconds"]), float(meta["generation_seconds"])
        else:
            result.held_out_kl_before = mean_kl(student, teacher, held, temperature=config.temperature)
            sampling = time.perf_counter()
            generated = _teacher_windows(teacher, config, windows.shape[1], progress)
            result.generation_seconds = time.perf_counter() - sampling
            save(0)
        train = torch.cat([train, generated.to(train.dtype)])
        result.train_windows, result.generated_windows = len(train), len(generated)
        for step in track(range(result.resumed_from, config.steps), progress, desc="heal steps"):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for row in _batch_rows(config, step, len(train)):
                ids = train[row].unsqueeze(0)
                with torch.no_grad():
                    target = model_logits(teacher, ids)[0]
                logits = model_logits(student, ids)[0]
                loss = _window_kl(logits, target, config.temperature)
                if config.ce_weight:
                    loss = loss + config.ce_weight * F.cross_entropy(logits[:-1].float(), ids[0, 1:].to(logits.device))
                (loss / config.batch_windows).backward()
                total += float(loss.detach()) / config.batch_windows
                del logits, target, loss
            if not math.isfinite(total):
                raise ValueError(f"healing step {step}: the loss is {total}; lower the learning rate (lr={config.lr})")
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
            optimizer.step()
            result.losses.append(total)
            done = step + 1
            if done % config.checkpoint_every == 0 or done == config.steps:
                save(done)
        result.steps = config.steps
        result.held_out_kl_after = mean_kl(student, teacher, held, temperature=config.temperature)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        for p, flag in teacher_flags.items():
            p.requires_grad_(flag)
        student.train(modes[0])
        teacher.train(modes[1])
    result.tokens = result.steps * config.batch_windows * windows.shape[1]
    result.seconds = earlier + time.perf_counter() - start
    return result


def check_heal_source(student: nn.Module, teacher: nn.Module, *, source: str | None = None) -> int:
    """Refuse a dense model that is not the one ``student`` was compressed from.

    Every tensor of ``student`` outside its factorized layers (the embedding, the norms, layers
    kept dense) must be in ``teacher`` under the same name and shape, with the same values once
    cast to the student's dtype (a model saved in bfloat16 is compared in bfloat16).

    Parameters
    ----------
    student, teacher : nn.Module
    source : str, optional
        The source the student's directory records (named in the message).

    Returns
    -------
    int
        How many tensors were compared.

    Raises
    ------
    ValueError
        Naming the first tensor that is missing, misshapen or different.
    """
    factorized = {name for name, module in student.named_modules() if isinstance(module, low_rank_types())}
    dense = teacher.state_dict()
    recorded = f" (its directory records the source {source!r})" if source else ""
    compared = 0
    for name, tensor in student.state_dict().items():
        if any(name.startswith(f"{layer}.") for layer in factorized):
            continue
        if name not in dense:
            raise ValueError(f"the dense model has no tensor {name!r}, which the compressed model kept as it was: it is not the model "
                             f"this one was compressed from{recorded}")
        reference = dense[name]
        if tuple(reference.shape) != tuple(tensor.shape) or not torch.equal(reference.to(tensor.device, tensor.dtype), tensor):
            raise ValueError(f"tensor {name!r} of the dense model differs from the compressed model's untouched copy: the dense model is "
                             f"not the one this model was compressed from{recorded}; pass that model")
        compared += 1
    if compared == 0:
        raise ValueError("the compressed model holds no tensor outside its factorized layers to compare with the dense model")
    return compared
