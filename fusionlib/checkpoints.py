"""Trained once, loaded everywhere: the book's checkpoints and their manifest (chapter 1, "How to run this book").

A chapter that trains a model asks :func:`train_or_load` for it. Whether the
model is trained in the notebook or loaded from disk is decided by
``$FUSIONLIB_TRAIN``:

``auto`` (default)
    Load a checkpoint whose *fingerprint* matches the recipe asked for, else train.
``always``
    Train, even when a checkpoint exists.
``never``
    Load, and fail with a clear message when no checkpoint matches.

Recipes are named by size, ``smoke < small < full``. A laptop reader (the
``cpu`` profile, whose own recipe is ``small``) loads the ``full`` checkpoints
that the book's tables come from, and trains the ``small`` recipe only when
asked or when no ``full`` checkpoint exists.

On disk
-------
``checkpoints/`` (committed; ``$FUSIONLIB_CHECKPOINTS`` overrides)::

    manifest.json                     one record per checkpoint (below)
    ch03/cross_attention/model.safetensors, config.json, history.json

Models trained in a notebook go to the cache (``.cache/checkpoints/``), never
to ``checkpoints/``: only ``scripts/train_book.py`` writes there, and a smaller
recipe never replaces a larger one's checkpoint.

A record (:class:`CheckpointRecord`) holds the name and chapter, the recipe,
the fingerprint and the *spec* it hashes (model class and config, the code
version of the model, the data, the train config, the batch size and the
seed), the device and torch version it trained with, its wall time, the
commit, its test metrics -- measured from the stored weights, after the cast
to float16 -- and the sha256 of the weights file, checked on every load.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import subprocess
import time
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fusionlib import runtime
from fusionlib.fileio import atomic_write_json, replace_dir, sha256_file

__all__ = [
    "RECIPES",
    "PROFILE_RECIPE",
    "TRAIN_ENV",
    "TRAIN_MODES",
    "CheckpointRecord",
    "Obtained",
    "checkpoint_root",
    "cache_checkpoint_root",
    "recipe_rank",
    "profile_recipe",
    "train_mode",
    "fingerprint",
    "read_manifest",
    "find_checkpoint",
    "find_by_spec",
    "save_checkpoint",
    "load_checkpoint",
    "train_or_load",
    "describe",
    "git_commit",
]

RECIPES = runtime.RECIPES
PROFILE_RECIPE = runtime.PROFILE_RECIPE
recipe_rank = runtime.recipe_rank
profile_recipe = runtime.profile_recipe
TRAIN_ENV = "FUSIONLIB_TRAIN"
TRAIN_MODES = ("auto", "always", "never")
MANIFEST_NAME = "manifest.json"
HISTORY_NAME = "history.json"
MANIFEST_VERSION = 1
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def checkpoint_root() -> str:
    """``checkpoints/`` at the repository root (``$FUSIONLIB_CHECKPOINTS`` overrides)."""
    return runtime.checkpoint_root()


def cache_checkpoint_root() -> str:
    """Where models trained in a notebook are kept: ``<cache>/checkpoints``, never the committed folder."""
    return os.path.join(runtime.cache_dir(), "checkpoints")


def train_mode() -> str:
    """``$FUSIONLIB_TRAIN``: ``auto`` (default), ``always`` or ``never``."""
    mode = os.environ.get(TRAIN_ENV, "").strip().lower() or "auto"
    if mode not in TRAIN_MODES:
        raise ValueError(f"{TRAIN_ENV} must be one of {TRAIN_MODES}, got {mode!r}")
    return mode


def _canonical(obj: Any) -> Any:
    """JSON-ready, order-independent form of a spec (tuples become lists, dataclasses dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return obj  # json keeps 1.0 distinct from 1; so do we
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(
        f"a checkpoint spec may hold only JSON values and dataclasses, got {type(obj).__name__}: {obj!r}"
    )


def fingerprint(spec: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 of ``spec`` as canonical JSON: equal specs, equal fingerprints."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a mapping, got {type(spec).__name__}")
    text = json.dumps(_canonical(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass
class CheckpointRecord:
    """One line of the manifest: what a checkpoint is, how it was trained and what it scores."""

    name: str  # "ch03/cross_attention": also its folder under the root
    chapter: str  # "03_cross_attention_fusion"
    recipe: str  # "smoke" | "small" | "full"
    fingerprint: str  # fingerprint(spec)
    spec: dict[str, Any]  # model class and config, code version, data, train config, batch, seed
    steps: int
    batch_size: int
    device: str  # "cpu (2 threads)" or the GPU's name
    torch: str
    wall_seconds: float  # training only
    commit: str  # the repository's commit when it was trained ("unknown" outside git)
    metrics: dict[str, Any]  # measured from the stored weights
    sha256: str  # of model.safetensors
    dtype: str  # how the weights are stored
    date: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckpointRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(d)
        if missing:
            raise ValueError(
                f"checkpoint record {d.get('name', '?')!r} lacks fields {sorted(missing)}"
            )
        return cls(**{k: d[k] for k in names})


def read_manifest(root: str | os.PathLike | None = None) -> dict[str, CheckpointRecord]:
    """``{name: record}`` from ``<root>/manifest.json`` (empty when there is none)."""
    root = os.fspath(root) if root is not None else checkpoint_root()
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format_version") != MANIFEST_VERSION:
        raise ValueError(
            f"{path} has format_version {data.get('format_version')!r}, expected {MANIFEST_VERSION}"
        )
    return {name: CheckpointRecord.from_dict(r) for name, r in data["checkpoints"].items()}


def _write_manifest(records: Mapping[str, CheckpointRecord], root: str) -> None:
    atomic_write_json(
        os.path.join(root, MANIFEST_NAME),
        {
            "format_version": MANIFEST_VERSION,
            "checkpoints": {name: records[name].to_dict() for name in sorted(records)},
        },
    )


def find_checkpoint(
    name: str, spec: Mapping[str, Any], roots: tuple[str, ...] | None = None
) -> tuple[CheckpointRecord, str] | None:
    """The record and root of a checkpoint called ``name`` whose fingerprint is ``fingerprint(spec)``, or None.

    ``roots`` defaults to the committed folder, then the cache.
    """
    wanted = fingerprint(spec)
    for root in roots or (checkpoint_root(), cache_checkpoint_root()):
        record = read_manifest(root).get(name)
        if record is not None and record.fingerprint == wanted:
            return record, root
    return None


def find_by_spec(
    spec: Mapping[str, Any], roots: tuple[str, ...] | None = None
) -> tuple[CheckpointRecord, str] | None:
    """The record and root of a checkpoint of any name whose fingerprint is ``fingerprint(spec)``, or None.

    Two experiments that train the same thing have the same spec, whatever
    they are called: chapter 6b's ablation finds chapter 6's UNITER this way
    instead of training it again. ``roots`` defaults to the committed folder
    alone; of several matches in one root, the first name in sorted order.
    """
    wanted = fingerprint(spec)
    for root in (checkpoint_root(),) if roots is None else roots:
        records = read_manifest(root)
        for name in sorted(records):
            if records[name].fingerprint == wanted:
                return records[name], root
    return None


def git_commit() -> str:
    """The repository's commit (12 digits), ``+changes`` when the library or scripts differ from it; else "unknown".

    Call it when training starts: the code that trains a model is the code
    loaded then, whatever lands in the repository before the weights are saved.
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=runtime.repo_root(), capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return "unknown"
    return commit + (
        "+changes" if git("status", "--porcelain", "--", "fusionlib", "scripts") else ""
    )


def device_label(device: torch.device) -> str:
    """What a record says it ran on: the GPU's name, or ``"cpu (N threads)"`` with torch's threads now."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def save_checkpoint(
    model: nn.Module,
    *,
    name: str,
    chapter: str,
    recipe: str,
    spec: Mapping[str, Any],
    steps: int,
    batch_size: int,
    device: torch.device | str,
    wall_seconds: float,
    history: Mapping[str, Any] | None = None,
    evaluate: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    dtype: str = "float16",
    root: str | os.PathLike | None = None,
    commit: str | None = None,
) -> CheckpointRecord:
    """Store ``model`` (a :class:`fusionlib.models.PretrainedModel`) under ``<root>/<name>`` and record it.

    The weights are cast to ``dtype`` for storage; ``evaluate(model)`` is then
    run on the *reloaded* weights, so the recorded metrics are those of what a
    reader loads. ``commit`` is :func:`git_commit` taken when training began
    (now, if not given). Refuses to replace a checkpoint of a larger recipe.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"model must be a fusionlib PretrainedModel (with save_pretrained), got {type(model).__name__}"
        )
    recipe_rank(recipe)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"name must be a relative path like 'ch03/cross_attention', got {name!r}")
    root = os.fspath(root) if root is not None else checkpoint_root()
    records = read_manifest(root)
    old = records.get(name)
    if old is not None and recipe_rank(old.recipe) > recipe_rank(recipe):
        raise ValueError(
            f"{root}/{name} holds the {old.recipe!r} recipe's checkpoint; a {recipe!r} run may not "
            "replace it (write it to another root)"
        )
    stored = copy.deepcopy(model).to("cpu", dtype=STORAGE_DTYPES[dtype])

    def write(folder: str) -> None:
        stored.save_pretrained(folder)
        if history is not None:
            atomic_write_json(os.path.join(folder, HISTORY_NAME), dict(history))

    folder = replace_dir(os.path.join(root, name), write)
    reloaded = _load_weights_dir(folder)
    metrics = dict(evaluate(reloaded)) if evaluate is not None else {}
    device = torch.device(device)
    record = CheckpointRecord(
        name=name,
        chapter=chapter,
        recipe=recipe,
        fingerprint=fingerprint(spec),
        spec=_canonical(spec),
        steps=int(steps),
        batch_size=int(batch_size),
        device=device_label(device),
        torch=torch.__version__,
        wall_seconds=round(float(wall_seconds), 1),
        commit=commit or git_commit(),
        metrics={k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
        sha256=sha256_file(os.path.join(folder, "model.safetensors")),
        dtype=dtype,
        date=time.strftime("%Y-%m-%d"),
    )
    records = read_manifest(root)  # re-read: another process may have added its own record
    records[name] = record
    _write_manifest(records, root)
    return record


def _load_weights_dir(folder: str) -> nn.Module:
    from fusionlib.models.io import load_pretrained

    model = load_pretrained(folder, map_location="cpu")
    return model.float().eval()


def load_checkpoint(
    name: str, root: str | os.PathLike | None = None, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointRecord, dict | None]:
    """``(model in float32, record, history or None)`` for checkpoint ``name``; the sha256 is checked first."""
    root = os.fspath(root) if root is not None else checkpoint_root()
    records = read_manifest(root)
    if name not in records:
        raise KeyError(
            f"no checkpoint {name!r} in {root}/{MANIFEST_NAME}; it has {sorted(records)}"
        )
    record = records[name]
    folder = os.path.join(root, name)
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} is missing (the manifest lists {name!r})")
    digest = sha256_file(weights)
    if digest != record.sha256:
        raise ValueError(
            f"{weights} has sha256 {digest}, the manifest records {record.sha256}: "
            "the file is corrupt or was replaced without updating the manifest"
        )
    model = _load_weights_dir(folder).to(map_location)
    history = None
    if os.path.isfile(os.path.join(folder, HISTORY_NAME)):
        with open(os.path.join(folder, HISTORY_NAME), encoding="utf-8") as f:
            history = json.load(f)
    return model, record, history


def describe(record: CheckpointRecord, headline: str | None = None) -> str:
    """'trained with the full recipe on <device> in 8.1 min, test relational 93.6%' for a record."""
    text = (
        f"trained with the {record.recipe} recipe on {record.device} in "
        f"{runtime.format_seconds(record.wall_seconds)} ({record.steps:,} steps x {record.batch_size})"
    )
    if headline is not None:
        if headline not in record.metrics:
            raise KeyError(
                f"headline {headline!r} is not among the recorded metrics {sorted(record.metrics)}"
            )
        value = record.metrics[headline]
        shown = (
            f"{100 * value:.1f}%" if isinstance(value, float) and 0 <= value <= 1 else f"{value}"
        )
        text += f", test {headline.replace('_', ' ')} {shown}"
    return text


@dataclasses.dataclass
class Obtained:
    """What :func:`train_or_load` returns: the model and how it came to be."""

    model: nn.Module
    record: CheckpointRecord  # for a model trained here, the record written to the cache
    history: dict[str, Any] | None  # History.to_dict() of its training
    loaded: bool  # True: read from disk; False: trained in this call
    root: str  # where the checkpoint lives


def train_or_load(
    name: str,
    *,
    chapter: str,
    specs: Mapping[str, Mapping[str, Any]],
    train_recipe: str,
    train: Callable[[], tuple[nn.Module, Mapping[str, Any], float]],
    evaluate: Callable[[nn.Module], Mapping[str, Any]] | None = None,
    headline: str | None = None,
    mode: str | None = None,
    device: torch.device | str | None = None,
    verbose: bool = True,
) -> Obtained:
    """Load checkpoint ``name`` if one matches, else train it; print which happened.

    Args:
        specs: ``{recipe: spec}`` for every recipe the caller could use with the
            data it has; the largest recipe with a matching checkpoint wins.
        train_recipe: the recipe trained when nothing matches (or ``mode="always"``);
            it must be a key of ``specs``.
        train: ``() -> (model, history dict, wall seconds)``, training ``train_recipe``.
        evaluate: test metrics of a model, recorded with a checkpoint trained here.
        headline: the metric the printed line quotes.
        mode: overrides ``$FUSIONLIB_TRAIN``.
    """
    mode = mode or train_mode()
    if mode not in TRAIN_MODES:
        raise ValueError(f"mode must be one of {TRAIN_MODES}, got {mode!r}")
    if train_recipe not in specs:
        raise ValueError(f"train_recipe {train_recipe!r} has no spec; specs has {sorted(specs)}")
    device = runtime.device() if device is None else torch.device(device)
    if mode != "always":
        for recipe in sorted(specs, key=recipe_rank, reverse=True):
            found = find_checkpoint(name, specs[recipe])
            if found is None:
                continue
            record, root = found
            model, record, history = load_checkpoint(name, root, map_location=device)
            if verbose:
                where = (
                    ""
                    if root == checkpoint_root()
                    else f" from {os.path.relpath(root, runtime.repo_root())}"
                )
                print(f"loaded {name}{where}: {describe(record, headline)}")
            return Obtained(model, record, history, True, root)
        if mode == "never":
            raise FileNotFoundError(
                f"no checkpoint {name!r} matches the recipes {sorted(specs, key=recipe_rank)} "
                f"(fingerprints {[fingerprint(s) for s in specs.values()]}); set {TRAIN_ENV}=auto to train it, "
                "or run scripts/train_book.py"
            )
    commit = git_commit()
    model, history, seconds = train()
    root = cache_checkpoint_root()
    record = save_checkpoint(
        model,
        name=name,
        chapter=chapter,
        recipe=train_recipe,
        spec=specs[train_recipe],
        steps=int(specs[train_recipe].get("train", {}).get("steps", 0)),
        batch_size=int(specs[train_recipe].get("batch_size", 0)),
        device=device,
        wall_seconds=seconds,
        history=history,
        evaluate=evaluate,
        root=root,
        commit=commit,
    )
    if verbose:
        print(
            f"trained {name} here with the {train_recipe} recipe in {runtime.format_seconds(seconds)}; "
            f"kept in {os.path.relpath(os.path.join(root, name), runtime.repo_root())}"
        )
    # What a reader loads next time is the stored (float16) copy: use it now too, so the numbers agree.
    model, record, history = load_checkpoint(name, root, map_location=device)
    return Obtained(model, record, history, False, root)
