"""One training loop for every chapter (chapters 3-7).

:func:`train` runs AdamW with a warm-up + decay schedule, gradient clipping,
optional bf16 autocast (CUDA by default; on CPU with ``cpu_amp``) and
``torch.compile`` (any device), periodic evaluation,
best-checkpoint saving and exact resumption. What a step *computes* is the
caller's: ``step_fn(model, batch, task) -> {"loss": tensor, ...}``. So the
same loop trains chapter 3's VQA models (one task) and UNITER's pretraining
(chapter 6), where every step samples **one** task from a mix
(``task_mix={"itm": 2, "mlm": 2, "mrfr": 1, "mrckl": 1}``) and draws its batch
from that task's loader.

Determinism and resumption
--------------------------
Each loader is read as an endless stream of epochs; epoch ``e`` of task ``t``
is shuffled with a generator seeded from ``(config.seed, t, e)``, which
:func:`train` installs in the loader (it takes over the loader's shuffling).
Task choices come from their own seeded generator. A checkpoint stores the
weights, the optimizer and scheduler, every random state, the position of
each stream and the history, so ``resume=True`` continues with exactly the
batches, task choices and dropout masks an uninterrupted run would have used:
20 steps straight and 10 + 10 resumed give the same losses (tested).

Several processes (chapter 7)
-----------------------------
Under ``torchrun`` (after :func:`fusionlib.distributed.init_distributed`),
:func:`train` wraps the model in ``DistributedDataParallel``, seeds each
rank's random streams with :func:`fusionlib.distributed.seed_for_rank`, logs
the *mean over ranks* of the loss and metrics (so the history is the global
batch's), shows the progress bar and writes checkpoints on rank 0 only. The
data is the caller's to shard: :func:`fusionlib.distributed.sharded_loader`
gives each rank its slice of the same global batches. Every rank draws the
same task at each step (the task generator is not per rank), as DDP needs
the same graph everywhere; a single-task ``step_fn`` must use every
parameter of the model (DDP's rule), a multi-task one may leave heads unused.

Checkpoints (``config.checkpoint_dir``)
----------------------------------------
``last/``: ``model.safetensors`` (+ ``config.json`` for :class:`fusionlib.models.PretrainedModel`)
and ``trainer_state.pt``, written every ``save_every`` steps, at every
evaluation and at the end. ``best/``: the weights with the best
``keep_best_by`` metric so far and ``best.json``. Both load on a CPU
(``map_location``), and ``trainer_state.pt`` holds only tensors and plain
Python values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
import zlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from fusionlib import distributed, fileio, runtime

__all__ = [
    "TrainConfig",
    "History",
    "train",
    "to_device",
    "lr_multiplier",
    "cpu_bf16_enabled",
    "lr_schedule",
    "make_optimizer",
    "load_weights",
    "DEFAULT_TASK",
]

DEFAULT_TASK = "train"  # the task name when train_data is a single DataLoader
SCHEDULES = ("cosine", "linear", "constant")
CPU_AMP_MODES = ("off", "auto", "bf16")
STATE_NAME = "trainer_state.pt"
WEIGHTS_NAME = "model.safetensors"
STATE_FORMAT_VERSION = 1
_TRAIN_COLUMNS = ("step", "task", "loss", "lr", "grad_norm", "seconds")
# Changing these between a run and its resumption changes the numbers it produces.
_RESULT_FIELDS = (
    "steps",
    "lr",
    "weight_decay",
    "betas",
    "eps",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "grad_clip",
    "seed",
    "amp",
)
# Also change the numbers, but are not in _RESULT_FIELDS: the book's checkpoint specs hash that tuple
# (fusionlib.experiments), and a new name there would change every fingerprint. Each with the value a
# checkpoint written before it existed was trained with.
_RESUME_ONLY_FIELDS = {"cpu_amp": "off"}


@dataclasses.dataclass
class TrainConfig:
    """Everything :func:`train` needs besides the model, the data and the step function.

    Steps are counted from 1: "step 3" is the third optimizer update.
    """

    steps: int = 1000
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    weight_decay: float = 0.01  # AdamW; matrices only, not biases or LayerNorm gains
    betas: tuple[float, float] = (0.9, 0.999)  # UNITER used (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    schedule: str = (
        "cosine"  # after warm-up: "cosine" | "linear" decay to min_lr_ratio * lr, or "constant"
    )
    min_lr_ratio: float = 0.0
    grad_clip: float | None = (
        1.0  # max global gradient norm; None: no clipping (the norm is still logged)
    )
    eval_every: int | None = None  # evaluate every this many steps (and always at the end)
    log_every: int = 10  # refresh the progress bar's loss every this many steps
    save_every: int | None = None  # write last/ every this many steps (default: at each evaluation)
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (runtime.autocast); the CPU follows cpu_amp
    # bf16 autocast on CPU: "off" (fp32), "auto" (bf16 where the CPU has native bf16,
    # runtime.cpu_bf16_support; else fp32 with a warning), "bf16" (always; emulated and slow without).
    cpu_amp: str = "off"
    compile: bool = False  # torch.compile the model (inductor; CUDA and CPU)
    checkpoint_dir: str | None = None  # None: no checkpoints
    keep_best_by: str | None = None  # an eval_fn metric, e.g. "val_accuracy"
    best_mode: str = "max"  # "max" (accuracy) or "min" (a loss)
    # (eval_fn metric, value): stop after the first evaluation at which the metric reaches the value,
    # e.g. ("shape_accuracy", 0.95) to pretrain until grounded (chapter 6b). The schedule keeps its length.
    stop_when: tuple[str, float] | None = None
    stop_mode: str = "max"  # "max": stop once metric >= value; "min": once metric <= value

    def __post_init__(self) -> None:
        for name in ("steps", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"warmup_steps must be an int in [0, steps={self.steps}], got {self.warmup_steps!r}"
            )
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        if not isinstance(self.cpu_amp, str) or self.cpu_amp not in CPU_AMP_MODES:
            raise ValueError(f"cpu_amp must be one of {CPU_AMP_MODES}, got {self.cpu_amp!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        for name in ("best_mode", "stop_mode"):
            if getattr(self, name) not in ("max", "min"):
                raise ValueError(f"{name} must be 'max' or 'min', got {getattr(self, name)!r}")
        if self.stop_when is not None:
            stop = tuple(self.stop_when)
            if (
                len(stop) != 2
                or not isinstance(stop[0], str)
                or isinstance(stop[1], bool)
                or not isinstance(stop[1], (int, float))
                or not math.isfinite(stop[1])
            ):
                raise ValueError(
                    f"stop_when must be (eval metric name, finite number), got {self.stop_when!r}"
                )
            self.stop_when = (stop[0], float(stop[1]))
            if self.eval_every is None:
                raise ValueError(
                    f"stop_when={self.stop_when!r} is checked at evaluations: set eval_every too"
                )
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def cpu_bf16_enabled(config: TrainConfig, device: torch.device | str, warn: bool = True) -> bool:
    """Whether :func:`train` runs its steps under bf16 autocast on this CPU (``config.cpu_amp``).

    False on any other device (``config.amp`` rules CUDA) and for ``"off"``.
    ``"auto"``: True where :func:`fusionlib.runtime.cpu_bf16_support` finds
    native bf16, else False with a ``RuntimeWarning`` that says why and that
    the run stays fp32. ``"bf16"``: always True, with a warning where the
    CPU has to emulate bf16 (correct, but slower than fp32).
    """
    if torch.device(device).type != "cpu" or config.cpu_amp == "off":
        return False
    supported, why = runtime.cpu_bf16_support()
    if config.cpu_amp == "auto" and not supported:
        if warn:
            warnings.warn(
                f"cpu_amp='auto': no native bf16 on this CPU ({why}); training in fp32",
                RuntimeWarning,
                stacklevel=2,
            )
        return False
    if config.cpu_amp == "bf16" and not supported and warn:
        warnings.warn(
            f"cpu_amp='bf16' on a CPU without native bf16 ({why}): correct but slower than fp32",
            RuntimeWarning,
            stacklevel=2,
        )
    return True


# ---------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """The factor on ``config.lr`` for the update with 0-based index ``step`` (step ``step + 1``).

    Warm-up: ``(step + 1) / warmup_steps``, so the first update already moves
    (a warm-up that starts at exactly 0 wastes a step). Then, with
    ``progress`` going from 0 to 1 over the remaining steps, cosine is
    ``m + (1 - m) * (1 + cos(pi * progress)) / 2`` and linear is
    ``m + (1 - m) * (1 - progress)``, where ``m = min_lr_ratio``.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    m = config.min_lr_ratio
    if config.schedule == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return m + (1.0 - m) * (1.0 - progress)


def lr_schedule(config: TrainConfig) -> list[float]:
    """The learning rate of every update, ``[lr at step 1, ..., lr at step config.steps]`` (for plots)."""
    return [config.lr * lr_multiplier(s, config) for s in range(config.steps)]


def make_optimizer(
    model: nn.Module, config: TrainConfig, device: torch.device | None = None
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (``dim >= 2``) only, as nanoGPT and BERT do.

    Biases and LayerNorm gains are not decayed: pulling a gain towards zero
    shrinks a whole feature, which is not the regularisation meant.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device is not None and torch.device(device).type == "cuda"
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        fused=fused or None,
    )


# ---------------------------------------------------------------------------
# History
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class History:
    """What happened during training, as columns of equal-length lists (plotting-friendly).

    ``train``: one row per step with ``step``, ``task``, ``loss``, ``lr`` (the
    rate used by that step), ``grad_norm`` (before clipping), ``seconds``
    (wall time since the start, summed over resumptions) and every extra metric
    ``step_fn`` returned (NaN in rows that did not report it).
    ``val``: one row per evaluation with ``step``, ``seconds`` and
    ``eval_fn``'s metrics. ``pandas.DataFrame(history.train)`` works as is.
    ``stopped_at``: the step of the evaluation at which ``config.stop_when``
    was met (``None`` if it never was; ``config.steps`` if only the last one met it).
    """

    train: dict[str, list] = dataclasses.field(
        default_factory=lambda: {c: [] for c in _TRAIN_COLUMNS}
    )
    val: dict[str, list] = dataclasses.field(default_factory=lambda: {"step": [], "seconds": []})
    best_metric: str | None = None
    best_step: int | None = None
    best_value: float | None = None
    seconds: float = 0.0  # total wall time, training and evaluation
    stopped_at: int | None = None

    @property
    def step(self) -> int:
        """The last step done (0 before training)."""
        return self.train["step"][-1] if self.train["step"] else 0

    def task_losses(self) -> dict[str, tuple[list[int], list[float]]]:
        """``{task: (steps, losses)}``: each task's loss curve."""
        out: dict[str, tuple[list[int], list[float]]] = {}
        for s, t, loss in zip(self.train["step"], self.train["task"], self.train["loss"]):
            steps, losses = out.setdefault(t, ([], []))
            steps.append(s)
            losses.append(loss)
        return out

    def series(self, name: str, split: str = "val") -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one column of ``train`` or ``val``, rows without a value dropped."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        table = getattr(self, split)
        if name not in table:
            raise KeyError(f"history.{split} has no {name!r}; it has {sorted(table)}")
        pairs = [
            (s, v)
            for s, v in zip(table["step"], table[name])
            if not (isinstance(v, float) and math.isnan(v))
        ]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def last_val(self) -> dict[str, float]:
        """The metrics of the last evaluation (empty before the first)."""
        if not self.val["step"]:
            return {}
        return {k: v[-1] for k, v in self.val.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": {k: list(v) for k, v in self.train.items()},
            "val": {k: list(v) for k, v in self.val.items()},
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "best_value": self.best_value,
            "seconds": self.seconds,
            "stopped_at": self.stopped_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "History":
        return cls(
            train={k: list(v) for k, v in d["train"].items()},
            val={k: list(v) for k, v in d["val"].items()},
            best_metric=d.get("best_metric"),
            best_step=d.get("best_step"),
            best_value=d.get("best_value"),
            seconds=float(d.get("seconds", 0.0)),
            stopped_at=d.get("stopped_at"),
        )

    def _append(self, table: dict[str, list], row: Mapping[str, Any]) -> None:
        n = len(table["step"])
        for key in row:
            if key not in table:
                table[key] = [math.nan] * n  # a metric that first appears now
        for key, column in table.items():
            column.append(row.get(key, math.nan))


# ---------------------------------------------------------------------------
# Data: endless, seeded, resumable streams of batches
# ---------------------------------------------------------------------------


def _derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a seed and names (``zlib.crc32`` is stable across runs; ``hash`` is not)."""
    ints = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class _LoaderStream:
    """Batches from one DataLoader, epoch after epoch, reshuffled from ``(seed, task, epoch)``.

    Takes over the loader's shuffling: a generator of ours becomes the
    loader's ``generator`` (the worker seeds come from it too) and, for a
    ``RandomSampler``, the sampler's. Samplers with ``set_epoch`` (e.g.
    ``DistributedSampler``) are told the epoch. Resuming at position ``k`` of
    an epoch re-opens that epoch and skips ``k`` batches, with the global
    random state set aside so that skipping cannot change it.
    """

    def __init__(self, loader: DataLoader, seed: int, task: str):
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"train_data for task {task!r} must be a torch DataLoader, got {type(loader).__name__}"
            )
        self.loader, self.seed, self.task = loader, seed, task
        self.epoch, self.position = 0, 0
        self._iterator = None
        self._generator = torch.Generator()
        loader.generator = self._generator
        if isinstance(loader.sampler, RandomSampler):
            loader.sampler.generator = self._generator

    def _open(self) -> None:
        self._generator.manual_seed(_derive_seed(self.seed, "data", self.task, self.epoch))
        for sampler in {
            id(s): s for s in (self.loader.sampler, self.loader.batch_sampler)
        }.values():
            if hasattr(sampler, "set_epoch"):  # DistributedSampler, ShardedBatchSampler
                sampler.set_epoch(self.epoch)
        self._iterator = iter(self.loader)

    def next(self) -> Any:
        if self._iterator is None:
            self._open()
            if self.position:
                with torch.random.fork_rng(devices=[]):
                    state = (random.getstate(), np.random.get_state())
                    for _ in range(self.position):
                        next(self._iterator)
                    random.setstate(state[0])
                    np.random.set_state(state[1])
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._open()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(
                    f"the DataLoader of task {self.task!r} yields no batches"
                ) from None
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterator = None


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor (in dicts, lists and tuples, nested) moved to ``device``."""
    device = torch.device(device)
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def _save_weights(model: nn.Module, directory: str) -> None:
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)  # weights + config.json: load_pretrained() rebuilds it
    else:
        save_model(model, os.path.join(directory, WEIGHTS_NAME), force_contiguous=True)


def load_weights(
    model: nn.Module, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load ``model.safetensors`` from a checkpoint folder (``last/`` or ``best/``) into ``model``."""
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    model.to(map_location)
    load_model(model, path, strict=True, device=str(torch.device(map_location)))
    return model


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if (
        state["cuda"]
        and torch.cuda.is_available()
        and len(state["cuda"]) == torch.cuda.device_count()
    ):
        torch.cuda.set_rng_state_all(state["cuda"])


def _last_checkpoint(checkpoint_dir: str) -> str | None:
    # fileio.replace_dir keeps last.old until the new last/ is in place: a crash mid-swap leaves one of them.
    for name in ("last", "last.old"):
        path = os.path.join(checkpoint_dir, name)
        if os.path.isfile(os.path.join(path, STATE_NAME)):
            return path
    return None


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def _as_tasks(train_data: DataLoader | Mapping[str, DataLoader]) -> dict[str, DataLoader]:
    if isinstance(train_data, DataLoader):
        return {DEFAULT_TASK: train_data}
    if isinstance(train_data, Mapping):
        if not train_data:
            raise ValueError(
                "train_data must be a DataLoader or a non-empty dict task -> DataLoader, got {}"
            )
        for task in train_data:
            if not isinstance(task, str) or not task:
                raise ValueError(
                    f"task names in train_data must be non-empty strings, got {task!r}"
                )
        return dict(train_data)
    raise TypeError(
        f"train_data must be a DataLoader or a dict task -> DataLoader, got {type(train_data).__name__}"
    )


def _task_weights(tasks: list[str], task_mix: Mapping[str, float] | None) -> Tensor:
    if task_mix is None:
        return torch.ones(len(tasks), dtype=torch.float64)
    if set(task_mix) != set(tasks):
        raise ValueError(
            f"task_mix must have one weight per task in train_data {sorted(tasks)}, "
            f"got weights for {sorted(task_mix)}"
        )
    weights = [float(task_mix[t]) for t in tasks]
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"task_mix weights must be finite, >= 0 and not all 0, got {dict(task_mix)}"
        )
    return torch.tensor(weights, dtype=torch.float64)


def _task_phases(
    tasks: list[str],
    task_mix: Mapping[str, float] | Sequence[tuple[int, Mapping[str, float]]] | None,
) -> list[tuple[int, Tensor]]:
    """``[(first_step, weights over tasks)]``: one phase for a plain mix, several for a schedule."""
    if task_mix is None or isinstance(task_mix, Mapping):
        return [(1, _task_weights(tasks, task_mix))]
    phases = list(task_mix)
    shape_ok = all(
        isinstance(p, (tuple, list))
        and len(p) == 2
        and isinstance(p[0], int)
        and not isinstance(p[0], bool)
        and isinstance(p[1], Mapping)
        for p in phases
    )
    if not phases or not shape_ok:
        raise ValueError(
            "task_mix must be {task: weight} or a list of (first_step, {task: weight}) phases, "
            f"got {task_mix!r}"
        )
    starts = [p[0] for p in phases]
    if starts[0] != 1 or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(
            f"task_mix phases must start at step 1 and at increasing steps, got starts {starts}"
        )
    out = []
    for start, mix in phases:
        unknown = sorted(set(mix) - set(tasks))
        if unknown:
            raise ValueError(
                f"task_mix phase from step {start} weighs tasks {unknown} that train_data "
                f"{sorted(tasks)} does not have"
            )
        out.append((start, _task_weights(tasks, {t: float(mix.get(t, 0.0)) for t in tasks})))
    never = [t for i, t in enumerate(tasks) if all(float(w[i]) == 0 for _, w in out)]
    if never:
        raise ValueError(f"tasks {never} have weight 0 in every phase of task_mix: drop their data")
    return out


def _phase_weights(phases: list[tuple[int, Tensor]], step: int) -> Tensor:
    weights = phases[0][1]
    for start, w in phases:
        if start <= step:
            weights = w
    return weights


def _loss_and_metrics(out: Any, step: int, task: str) -> tuple[Tensor, dict[str, float | Tensor]]:
    where = f"step {step} (task {task!r})"
    if not isinstance(out, Mapping) or "loss" not in out:
        raise TypeError(
            f"step_fn must return a dict with a 'loss' tensor, got {type(out).__name__} at {where}"
        )
    loss = out["loss"]
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            f"step_fn's 'loss' must be a scalar tensor that requires grad, at {where}; got "
            f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}"
        )
    metrics = {}
    for key, value in out.items():
        if key == "loss":
            continue
        if key in _TRAIN_COLUMNS:
            raise ValueError(
                f"step_fn returned {key!r}, a name the history uses itself ({_TRAIN_COLUMNS})"
            )
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"step_fn's metric {key!r} must be a number, got shape {tuple(value.shape)}"
                )
            metrics[key] = value.detach().reshape(())  # read back with the loss, in one go
        else:
            metrics[key] = float(value)
    return loss, metrics


def _evaluate(
    model: nn.Module, eval_fn: Callable[[nn.Module], Mapping[str, float]], step: int
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            metrics = eval_fn(model)
    finally:
        model.train(was_training)
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"eval_fn must return a dict of floats, got {type(metrics).__name__} at step {step}"
        )
    out = {}
    for key, value in metrics.items():
        if key in ("step", "seconds"):
            raise ValueError(f"eval_fn returned {key!r}, a name the history uses itself")
        out[key] = float(value.item() if isinstance(value, Tensor) else value)
    return out


def _better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def train(
    model: nn.Module,
    train_data: DataLoader | Mapping[str, DataLoader],
    config: TrainConfig,
    step_fn: Callable[[nn.Module, Any, str], Mapping[str, Any]],
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    task_mix: Mapping[str, float] | Sequence[tuple[int, Mapping[str, float]]] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    resume: bool = False,
) -> History:
    """Train ``model`` for ``config.steps`` updates; return the :class:`History`.

    Args:
        model: any ``nn.Module``; moved to ``device`` and trained in place.
        train_data: a ``DataLoader`` (task ``"train"``) or a dict ``task -> DataLoader``.
            :func:`train` reseeds their shuffling (see the module docstring).
        config: a :class:`TrainConfig`.
        step_fn: ``step_fn(model, batch, task) -> {"loss": scalar tensor, **metrics}``,
            called under bf16 autocast when ``config.amp`` on CUDA, or on a CPU
            when :func:`cpu_bf16_enabled` says so (``config.cpu_amp``), with the
            batch already on ``device``. ``model`` is the compiled module when
            ``config.compile`` (inductor, on CUDA or CPU). Extra metrics (floats
            or 1-element tensors) go into ``history.train``.
        eval_fn: ``eval_fn(model) -> {name: float}``, called in eval mode under
            ``torch.no_grad()`` every ``config.eval_every`` steps and at the end,
            with the uncompiled model.
        task_mix: ``{task: weight}``; each step samples one task with these
            weights (uniform when None), as UNITER does. Or a schedule, a list of
            ``(first_step, {task: weight})`` phases from step 1 (a task left out of a
            phase has weight 0 there): ``[(1, {"mlm": 1}), (1001, {"mlm": 1, "itm": 1})]``
            trains MLM alone for 1,000 steps, then both.
        device: defaults to :func:`fusionlib.runtime.device`.
        progress: show a tqdm progress bar with the loss and learning rate.
        resume: continue from ``checkpoint_dir/last`` if it exists (otherwise
            start afresh). A finished run (or one stopped by
            ``config.stop_when``) returns its history at once.

    Raises:
        FloatingPointError: a loss or gradient norm is NaN/inf; the message
            names the step and the task. Nothing is updated with it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if resume and config.checkpoint_dir is None:
        raise ValueError("resume=True needs config.checkpoint_dir to find the checkpoint in")
    for field in ("keep_best_by", "stop_when"):
        if getattr(config, field) is not None and eval_fn is None:
            raise ValueError(
                f"{field}={getattr(config, field)!r} needs an eval_fn that returns the metric"
            )
    loaders = _as_tasks(train_data)
    tasks = list(loaders)
    phases = _task_phases(tasks, task_mix)
    device = runtime.device() if device is None else torch.device(device)

    model.to(device)
    optimizer = make_optimizer(model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, config))
    streams = {t: _LoaderStream(loader, config.seed, t) for t, loader in loaders.items()}
    task_generator = torch.Generator().manual_seed(_derive_seed(config.seed, "tasks"))
    history = History(best_metric=config.keep_best_by)
    start = 0

    checkpoint = _last_checkpoint(config.checkpoint_dir) if resume else None
    if checkpoint is not None:
        state = torch.load(
            os.path.join(checkpoint, STATE_NAME), map_location="cpu", weights_only=True
        )
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(
                f"{checkpoint} has trainer-state format {state.get('format_version')!r}, "
                f"expected {STATE_FORMAT_VERSION}"
            )
        if sorted(state["streams"]) != sorted(tasks):
            raise ValueError(
                f"checkpoint {checkpoint} was trained on tasks {sorted(state['streams'])}, "
                f"train_data has {sorted(tasks)}"
            )
        saved = {**_RESUME_ONLY_FIELDS, **state["train_config"]}
        changed = [
            k
            for k in _RESULT_FIELDS + tuple(_RESUME_ONLY_FIELDS)
            if saved.get(k) != config.to_dict()[k]
        ]
        if changed:
            warnings.warn(
                f"resuming {checkpoint} with different {changed}: the run will not match an "
                "uninterrupted one",
                stacklevel=2,
            )
        load_weights(model, checkpoint, map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for t, s in state["streams"].items():
            streams[t].load_state_dict(s)
        task_generator.set_state(state["task_generator"])
        history = History.from_dict(state["history"])
        stopped_under = state["train_config"].get("stop_when")
        if history.stopped_at is not None and (
            tuple(stopped_under or ()) != tuple(config.stop_when or ())
            or state["train_config"].get("stop_mode", "max") != config.stop_mode
        ):
            warnings.warn(
                f"{checkpoint} stopped at step {history.stopped_at} under stop_when={stopped_under!r}; "
                f"with stop_when={config.stop_when!r} training goes on",
                stacklevel=2,
            )
            history.stopped_at = None
        _set_rng_state(state["rng"])
        start = int(state["step"])
        if (
            distributed.get_rank() > 0
        ):  # the checkpoint holds rank 0's streams; the others re-derive theirs
            runtime.seed_everything(
                distributed.seed_for_rank(_derive_seed(config.seed, "resume", start))
            )
    else:
        runtime.seed_everything(distributed.seed_for_rank(config.seed))

    main_process = distributed.is_main_process()

    def save_last(step: int) -> None:
        if not main_process:
            return
        state = {
            "format_version": STATE_FORMAT_VERSION,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "streams": {t: s.state_dict() for t, s in streams.items()},
            "task_generator": task_generator.get_state(),
            "history": history.to_dict(),
            "train_config": config.to_dict(),
            "rng": _rng_state(),
        }

        def write(folder: str) -> None:
            _save_weights(model, folder)
            torch.save(state, os.path.join(folder, STATE_NAME))

        fileio.replace_dir(os.path.join(config.checkpoint_dir, "last"), write)

    def evaluate(step: int) -> None:
        started = time.perf_counter()
        metrics = _evaluate(model, eval_fn, step)
        metrics["eval_seconds"] = time.perf_counter() - started
        history._append(history.val, {"step": step, "seconds": elapsed(), **metrics})
        if config.stop_when is not None:
            name, target = config.stop_when
            if name not in metrics:
                raise ValueError(
                    f"stop_when={config.stop_when!r}: {name!r} is not among eval_fn's metrics "
                    f"{sorted(metrics)}"
                )
            value = float(metrics[name])
            if (
                distributed.is_distributed()
            ):  # every rank must leave the loop at the same step: all use the mean
                value = distributed.all_reduce_mean(
                    torch.tensor([value], dtype=torch.float64, device=device)
                ).item()
            if value >= target if config.stop_mode == "max" else value <= target:
                history.stopped_at = step
        if config.keep_best_by is None:
            return
        if config.keep_best_by not in metrics:
            raise ValueError(
                f"keep_best_by={config.keep_best_by!r} is not among eval_fn's metrics "
                f"{sorted(metrics)}"
            )
        value = metrics[config.keep_best_by]
        if _better(value, history.best_value, config.best_mode):
            history.best_step, history.best_value = step, value
            if config.checkpoint_dir is not None and main_process:

                def write(folder: str) -> None:
                    _save_weights(model, folder)
                    with open(os.path.join(folder, "best.json"), "w", encoding="utf-8") as f:
                        json.dump(
                            {
                                "step": step,
                                "metric": config.keep_best_by,
                                "value": value,
                                "metrics": metrics,
                            },
                            f,
                            indent=2,
                        )

                fileio.replace_dir(os.path.join(config.checkpoint_dir, "best"), write)

    run_model = model
    if distributed.is_distributed():
        # With several tasks each step trains only its own head: DDP must look for the unused parameters.
        run_model = distributed.wrap_model(model, device, find_unused_parameters=len(tasks) > 1)
    run_model = torch.compile(run_model) if config.compile else run_model
    cpu_bf16 = cpu_bf16_enabled(config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = config.grad_clip if config.grad_clip is not None else math.inf
    seconds_before, started = history.seconds, time.perf_counter()

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - started

    last_eval = history.val["step"][-1] if history.val["step"] else 0
    model.train()
    bar = runtime.progress(
        total=config.steps,
        initial=start,
        disable=not progress or not main_process,
        desc="train",
        unit="step",
    )
    recent: list[float] = []
    end = (
        config.steps if history.stopped_at is None else start
    )  # a resumed run that had stopped is done
    try:
        for step in range(start + 1, end + 1):
            task = (
                tasks[0]
                if len(tasks) == 1
                else tasks[
                    int(
                        torch.multinomial(_phase_weights(phases, step), 1, generator=task_generator)
                    )
                ]
            )
            batch = to_device(streams[task].next(), device)
            lr = optimizer.param_groups[0]["lr"]
            with runtime.autocast(device, enabled=config.amp, cpu=cpu_bf16):
                out = step_fn(run_model, batch, task)
            loss, metrics = _loss_and_metrics(out, step, task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # One read-back per step (loss, gradient norm, tensor metrics): every read-back
            # waits for the GPU, and a small model is otherwise limited by such waits.
            names = [k for k, v in metrics.items() if isinstance(v, Tensor)]
            values = torch.stack(
                [
                    loss.detach().float(),
                    norm.float().to(loss.device),
                    *(metrics[k].float().to(loss.device) for k in names),
                ]
            )
            # Under DDP: the mean over ranks, i.e. the global batch's loss (the gradient norm is the same everywhere).
            values = distributed.all_reduce_mean(values).tolist()
            loss_value, grad_norm = values[0], values[1]
            metrics.update(zip(names, values[2:]))
            # Checked before optimizer.step(): a NaN never reaches the weights.
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"loss is {loss_value} at step {step} (task {task!r}); stopping before "
                    "the update. Check the inputs of this batch, lower lr or add warm-up."
                )
            if not math.isfinite(grad_norm):
                raise FloatingPointError(
                    f"gradient norm is {grad_norm} at step {step} (task {task!r}); "
                    "stopping before the update."
                )
            optimizer.step()
            scheduler.step()
            history._append(
                history.train,
                {
                    "step": step,
                    "task": task,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "seconds": elapsed(),
                    **metrics,
                },
            )
            recent.append(loss_value)
            if eval_fn is not None and config.eval_every and step % config.eval_every == 0:
                evaluate(step)
                last_eval = step
            if eval_fn is not None and step == config.steps and last_eval != step:
                evaluate(step)
                last_eval = step
            history.seconds = elapsed()
            if config.checkpoint_dir is not None:
                every = config.save_every or config.eval_every
                if step == config.steps or (every and step % every == 0) or last_eval == step:
                    save_last(step)  # a stop follows an evaluation, so the stopped run is saved
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                postfix = {"loss": f"{sum(recent) / len(recent):.4f}", "lr": f"{lr:.2e}"}
                if len(tasks) > 1:
                    postfix["task"] = task
                if history.val["step"] and config.keep_best_by:
                    postfix[config.keep_best_by] = f"{history.val[config.keep_best_by][-1]:.4f}"
                bar.set_postfix(postfix, refresh=False)
                recent.clear()
            if history.stopped_at is not None:
                break
    finally:
        bar.close()
    history.seconds = elapsed()
    return history
