"""Configs, a model registry, and saving/loading models as safetensors + config JSON.

Every model in :mod:`fusionlib.models` is an :class:`PretrainedModel`: an
``nn.Module`` built from one config dataclass (a :class:`ModelConfig`), with

* ``model.save_pretrained(directory)`` -> ``model.safetensors`` (the weights)
  and ``config.json`` (the model's class, its module and the config fields);
* :func:`load_pretrained` ``(directory, map_location="cpu")`` -> the same model,
  rebuilt from ``config.json`` without the caller naming its class;
* ``build_model(name, config)`` -> a fresh model from the registry, by its
  short name (``"cross_attention"``, ``"late_fusion"``, ...).

The weights are written with ``safetensors.torch.save_model``, which handles
tied weights (an MLM head sharing the word-embedding matrix, chapter 4), and
nothing is unpickled on load: a checkpoint cannot run code.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable, ClassVar, TypeVar

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from fusionlib.fileio import atomic_write, atomic_write_json

__all__ = [
    "ModelConfig",
    "PretrainedModel",
    "register_model",
    "build_model",
    "available_models",
    "load_pretrained",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1

_REGISTRY: dict[str, type["PretrainedModel"]] = {}

C = TypeVar("C", bound="ModelConfig")
M = TypeVar("M", bound=type)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Base of every model config: a frozen dataclass that round-trips through JSON."""

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {unknown}; it has {sorted(names)}")
        return cls(**d)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


class PretrainedModel(nn.Module):
    """An ``nn.Module`` built from a :class:`ModelConfig`, savable with :meth:`save_pretrained`.

    Subclasses set ``config_class`` and take the config as their only
    constructor argument, so ``cls(config)`` rebuilds them.
    """

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    registry_name: ClassVar[str | None] = None  # set by register_model

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created); return it."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "model_class": type(self).__name__,
            "model_module": type(self).__module__,
            "config_class": type(self.config).__name__,
            "config": self.config.to_dict(),
        }
        # Each file is swapped in whole: a run killed mid-save leaves the previous weights, never half of them.
        atomic_write(
            os.path.join(directory, WEIGHTS_NAME),
            lambda path: save_model(self, path, force_contiguous=True),
        )
        atomic_write_json(os.path.join(directory, CONFIG_NAME), meta)
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ):
        """Load what :meth:`save_pretrained` wrote; raises if it holds another model class."""
        model = load_pretrained(directory, map_location)
        if not isinstance(model, cls):
            raise TypeError(
                f"{os.fspath(directory)} holds a {type(model).__name__}, not a {cls.__name__}"
            )
        return model


def register_model(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`PretrainedModel` buildable as ``build_model(name, config)``."""

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, PretrainedModel)):
            raise TypeError(f"register_model expects a PretrainedModel subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"a model is already registered as {name!r}: {_REGISTRY[name].__name__}"
            )
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def available_models() -> list[str]:
    """The names :func:`build_model` knows."""
    return sorted(_REGISTRY)


def build_model(name: str, config: ModelConfig) -> PretrainedModel:
    """A freshly initialised model of the registered kind ``name`` (see :func:`available_models`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    return _REGISTRY[name](config)


def load_pretrained(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> PretrainedModel:
    """Rebuild the model saved in ``directory`` from its ``config.json`` and load its weights.

    The model comes back in eval mode on ``map_location`` (CPU by default, so a
    GPU checkpoint opens on a laptop). Only classes defined inside ``fusionlib``
    and registered with :func:`register_model` are rebuilt.
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found; save_pretrained writes {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    with open(config_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    module_name, class_name = meta["model_module"], meta["model_class"]
    if not module_name.startswith("fusionlib."):
        raise ValueError(
            f"{config_path} names module {module_name!r}; only fusionlib models are loaded"
        )
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if cls is None or cls not in _REGISTRY.values():
        raise ValueError(
            f"{module_name}.{class_name} (from {config_path}) is not a registered fusionlib model"
        )
    if cls.config_class.__name__ != meta["config_class"]:
        raise ValueError(
            f"{class_name} takes a {cls.config_class.__name__}, but {config_path} "
            f"holds a {meta['config_class']}"
        )
    model = cls(cls.config_class.from_dict(meta["config"]))
    model.to(map_location)
    load_model(model, weights_path, strict=True, device=str(map_location))
    return model.eval()
