"""Where and how big: the run profile, the device, seeding, autocast and timing.

Every chapter starts with ``print(runtime.summary())`` and sizes its
experiments with :func:`pick`, so the same notebook runs as a CI smoke test, a
laptop lesson, or the real GPU run (chapter 1, "How to run this book").

Profiles (environment variable ``FUSIONLIB_PROFILE``):

``smoke``
    CI: every notebook in well under a minute on 2 CPU cores, same code path.
``cpu``
    A laptop: a few minutes per chapter.
``gpu``
    The real run; the default when CUDA is available.

Each profile trains one *recipe*, named by size: smoke -> ``smoke``, cpu ->
``small``, gpu -> ``full``. A results file records its recipe, and a run of a
smaller recipe never overwrites the results of a larger one
(:func:`write_results`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from fusionlib.fileio import atomic_write_text

PROFILES = ("smoke", "cpu", "gpu")
PROFILE_ENV = "FUSIONLIB_PROFILE"
RECIPES = ("smoke", "small", "full")
PROFILE_RECIPE = {"smoke": "smoke", "cpu": "small", "gpu": "full"}
RECIPE_PROFILE = {
    recipe: name for name, recipe in PROFILE_RECIPE.items()
}  # the profile sized for a recipe

T = TypeVar("T")


def profile() -> str:
    """The active profile: ``$FUSIONLIB_PROFILE``, else ``gpu`` with CUDA, else ``cpu``."""
    name = os.environ.get(PROFILE_ENV, "").strip().lower()
    if not name:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV} must be one of {PROFILES}, got {name!r}")
    return name


def pick(*, smoke: T, cpu: T, gpu: T, profile_name: str | None = None) -> T:
    """Return the value for the active profile, e.g. ``steps = pick(smoke=20, cpu=2_000, gpu=20_000)``."""
    name = profile_name or profile()
    if name not in PROFILES:
        raise ValueError(f"profile_name must be one of {PROFILES}, got {name!r}")
    return {"smoke": smoke, "cpu": cpu, "gpu": gpu}[name]


def recipe_rank(recipe: str) -> int:
    """0 for ``smoke``, 1 for ``small``, 2 for ``full``."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    return RECIPES.index(recipe)


def profile_recipe(profile_name: str | None = None) -> str:
    """The recipe a profile trains: smoke -> ``smoke``, cpu -> ``small``, gpu -> ``full``."""
    name = profile_name or profile()
    if name not in PROFILES:
        raise ValueError(f"profile_name must be one of {PROFILES}, got {name!r}")
    return PROFILE_RECIPE[name]


def device(prefer: str | None = None) -> torch.device:
    """The device to compute on: ``prefer`` if given, else CUDA when available, else CPU."""
    if prefer is not None:
        dev = torch.device(prefer)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"prefer={prefer!r} asks for CUDA but torch.cuda.is_available() is False"
            )
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = 0, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same.

    ``deterministic=True`` also asks cuDNN and torch for deterministic kernels,
    which is slower and only matters when bitwise-identical GPU runs are wanted.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def step_generator(generator: torch.Generator | None = None) -> torch.Generator:
    """``generator`` if given, else a CPU generator seeded by one draw from the global one (chapters 4-6).

    A training step draws its masks and negatives from it. The global
    generator is what :func:`fusionlib.train.train` seeds from
    ``config.seed`` and saves and restores with every checkpoint, so each
    step gets its own draws, the same ones on every run, and a resumed run
    continues with exactly the draws it would have made.
    """
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        return generator
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.long)))


def autocast(dev: torch.device | str | None = None, enabled: bool = True, cpu: bool = False):
    """bf16 autocast on CUDA when ``enabled``; on CPU only when ``cpu`` is True, else a no-op context.

    On a CPU without native bf16 instructions fp32 is faster; whether this
    CPU has them is :func:`cpu_bf16_support`'s answer, which
    :class:`fusionlib.train.TrainConfig`'s ``cpu_amp`` consults before
    passing ``cpu=True``.
    """
    dev = torch.device(dev) if dev is not None else device()
    if enabled and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu and dev.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_bf16_support() -> tuple[bool, str]:
    """``(supported, why)``: does this CPU compute bf16 matrix products natively (chapter 7)?

    True needs oneDNN's bf16 kernels (``torch.ops.mkldnn._is_mkldnn_bf16_supported``)
    *and* bf16 instructions: AVX512-BF16 or AMX on x86 (``torch.cpu``'s
    capability checks), the BF16 extension on Arm (which oneDNN's check
    already requires there). An x86 CPU with plain AVX512 passes oneDNN's
    check but converts every bf16 operand in software, which is slower than
    fp32: that counts as unsupported. ``why`` says what was found, for the
    message of a fallback. Only APIs present since torch 2.3 are used, each
    behind a check, so an older or stripped build answers False, never raises.
    """
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    capability = "unknown"
    with contextlib.suppress(AttributeError, RuntimeError):
        capability = str(torch.backends.cpu.get_cpu_capability())
    if not onednn:
        return False, f"oneDNN has no bf16 kernels for this CPU (vector ISA {capability})"
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        found = [
            name
            for name, check in (
                ("AVX512-BF16", "_is_avx512_bf16_supported"),
                ("AMX", "_is_amx_tile_supported"),
            )
            if getattr(torch.cpu, check, lambda: False)()
        ]
        if not found:
            return False, (
                f"the CPU has {capability} but neither AVX512-BF16 nor AMX: bf16 would be "
                "converted in software, slower than fp32"
            )
        return True, f"{' and '.join(found)} ({capability})"
    return True, f"oneDNN bf16 kernels on {machine or 'this CPU'} ({capability})"


def synchronize(dev: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work so that wall-clock timings are honest."""
    dev = torch.device(dev) if dev is not None else device()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@dataclass
class Timer:
    """Wall-clock timer: ``with Timer("train") as t: ...``, then ``t.seconds``.

    Synchronises CUDA at both ends so GPU work is counted where it happens.
    """

    name: str = ""
    verbose: bool = True
    seconds: float = field(default=0.0, init=False)
    _start: float = field(default=0.0, init=False, repr=False)

    def __enter__(self) -> "Timer":
        synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        synchronize()
        self.seconds = time.perf_counter() - self._start
        if self.verbose and exc[0] is None:
            label = f"{self.name}: " if self.name else ""
            print(f"{label}wall time {format_seconds(self.seconds)}")


def format_percent(fraction: float, digits: int = 1) -> str:
    """``0.9361 -> '93.6%'``: how the book's tables print accuracies and recalls."""
    return f"{100 * fraction:.{digits}f}%"


def format_seconds(seconds: float) -> str:
    """``75.3`` -> ``'1 min 15.3 s'``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:.1f} s"


def environment() -> dict[str, Any]:
    """Profile, device, GPU name and library versions, as a dict (stored in ``results/*.json``)."""
    import fusionlib

    dev = device()
    info: dict[str, Any] = {
        "profile": profile(),
        "device": dev.type,
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fusionlib": fusionlib.__version__,
    }
    return info


def summary() -> str:
    """One line for each chapter's first cell: profile, device, GPU, versions."""
    env = environment()
    where = env["gpu"] if env["gpu"] else f"{env['cpu_threads']} CPU threads"
    return (
        f"profile={env['profile']} | device={env['device']} ({where}) | "
        f"python {env['python']} | torch {env['torch']} | fusionlib {env['fusionlib']}"
    )


_written: dict[str, str] = {}  # chapter -> the file this process last wrote or kept for it


def write_results(
    chapter: str,
    metrics: dict[str, Any],
    directory: str | os.PathLike | None = None,
    recipe: str | None = None,
    **extra: Any,
) -> str:
    """Write ``results/<chapter>.json`` with ``metrics`` plus the recipe, the environment and the date.

    Tables in the book are built from these files, never typed by hand.
    Returns the path written (atomically). ``recipe`` defaults to the
    profile's. Two rules keep the committed numbers:

    * a file written by a larger recipe is never overwritten: this run's
      results go to ``<cache>/results-<recipe>/<chapter>.json`` instead, and
      the message says so;
    * a file that already holds these very metrics (and ``extra``) for this
      recipe is left as it is, so re-running a chapter that loads its
      checkpoints leaves ``git status`` clean. Wall times (any field whose
      name contains ``seconds``) are measurements of a machine, not results:
      they differ on every run, so they are left out of that comparison and
      the file keeps the times of the run it records, as the message says.

    :func:`read_results` then reads whichever file this run's results are in.
    """
    if not chapter or "/" in chapter:
        raise ValueError(
            f"chapter must be a bare name like '03_cross_attention_fusion', got {chapter!r}"
        )
    recipe = recipe or profile_recipe()
    recipe_rank(recipe)
    record = {
        "chapter": chapter,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "recipe": recipe,
        **environment(),
        **extra,
        "metrics": metrics,
    }
    text = json.dumps(record, indent=2, sort_keys=False, default=_json_default) + "\n"
    path = os.path.join(
        os.fspath(directory) if directory is not None else results_dir(), f"{chapter}.json"
    )
    if directory is None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        old_recipe = old.get("recipe") or PROFILE_RECIPE.get(old.get("profile"), "small")
        if recipe_rank(old_recipe) > recipe_rank(recipe):
            side = os.path.join(cache_dir(), f"results-{recipe}", f"{chapter}.json")
            atomic_write_text(side, text)
            print(
                f"results/{chapter}.json holds the {old_recipe} recipe's results and is kept; "
                f"this {recipe} run's results went to {os.path.relpath(side, repo_root())}"
            )
            _written[chapter] = side
            return side
        new = json.loads(text)
        if old_recipe == recipe and all(
            _same(old.get(k), new[k], skip=_is_wall_time) for k in ("metrics", *extra)
        ):
            kept = "left as it is"
            if not all(_same(old.get(k), new[k]) for k in ("metrics", *extra)):
                kept += f" (its wall times are those of the run it records, on {old.get('date')})"
            print(f"results/{chapter}.json already holds these results ({recipe} recipe): {kept}")
            _written[chapter] = path
            return path
    atomic_write_text(path, text)
    _written[chapter] = path
    return path


def _is_wall_time(key: str) -> bool:
    """``train_seconds``, ``feature_seconds_per_split``...: a measured wall time, not a result."""
    return "seconds" in key


def _same(a: Any, b: Any, skip: Callable[[str], bool] | None = None) -> bool:
    """Equal JSON values, floats within a relative 1e-9 (the last bits of a re-evaluation may move).

    Dict entries whose key ``skip`` accepts are not compared (both sides must still have the key).
    """
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(
            (skip is not None and skip(str(k))) or _same(a[k], b[k], skip) for k in a
        )
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, skip) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
        )
    return a == b


def read_results(chapter: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read what :func:`write_results` wrote (in this process: the file it wrote or kept)."""
    if directory is None and chapter in _written:
        path = _written[chapter]
    else:
        directory = os.fspath(directory) if directory is not None else results_dir()
        path = os.path.join(directory, f"{chapter}.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def repo_root() -> str:
    """The repository root (the folder holding ``_toc.yml``), found upwards from the cwd.

    Notebooks run from ``notebooks/``; results, checkpoints and caches live at
    the root. ``$FUSIONLIB_ROOT`` overrides the search.
    """
    env = os.environ.get("FUSIONLIB_ROOT")
    if env:
        return env
    here = os.path.abspath(os.getcwd())
    probe = here
    while True:
        if os.path.exists(os.path.join(probe, "_toc.yml")):
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return here
        probe = parent


def results_dir() -> str:
    """``results/`` at the repository root; under the smoke profile a scratch folder in the cache.

    Smoke runs (CI, ``make test``) must never overwrite the committed numbers
    that the book's tables are built from.
    """
    if profile() == "smoke":
        return os.path.join(cache_dir(), "smoke-results")
    return os.path.join(repo_root(), "results")


def checkpoint_root() -> str:
    """``checkpoints/`` at the repository root: the book's committed weights (``$FUSIONLIB_CHECKPOINTS`` overrides)."""
    return os.environ.get("FUSIONLIB_CHECKPOINTS") or os.path.join(repo_root(), "checkpoints")


def cache_dir() -> str:
    """Where generated data, features and checkpoints are cached (``$FUSIONLIB_CACHE`` overrides)."""
    return os.environ.get("FUSIONLIB_CACHE") or os.path.join(repo_root(), ".cache")


def progress(iterable: Any = None, **kwargs: Any):
    """A text progress bar (tqdm) on stdout, the same in a terminal, Jupyter and the rendered book.

    ``tqdm.auto`` would draw a widget in Jupyter, which needs ``ipywidgets``
    and leaves nothing readable in a committed notebook; a text bar's final
    state is what the book shows (``scripts/execute_notebooks.py`` keeps only
    the last update of each bar).
    """
    from tqdm import tqdm

    kwargs.setdefault("file", sys.stdout)
    kwargs.setdefault("ncols", 100)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (benchmarks)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class BudgetSpent(BaseException):
    """Raised by :func:`time_budget`'s alarm when its seconds have passed.

    A ``BaseException``, like ``KeyboardInterrupt``: the alarm may fire inside a
    cache loader's ``except Exception`` fallback, which must not mistake it for
    a corrupt file.
    """


# budget_held's state: how deep the held blocks are, and whether the alarm fired inside one.
_budget = {"held": 0, "pending": False}


@contextlib.contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Raise :class:`BudgetSpent` in the block once ``seconds`` have passed (None: no limit).

    For the resumable scripts (``scripts/train_book.py``, ``scripts/ablation.py``):
    their training state is saved as it goes, so a run stopped here continues
    when started again. Main thread only (``SIGALRM``); the previous handler is
    restored on leaving. Inside :func:`budget_held` the alarm waits.
    """
    if seconds is None:
        yield
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"seconds must be a positive number or None, got {seconds!r}")

    def spent(signum: int, frame: Any) -> None:
        if _budget["held"]:
            _budget["pending"] = True
        else:
            raise BudgetSpent()

    previous = signal.signal(signal.SIGALRM, spent)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _budget["pending"] = False


@contextlib.contextmanager
def budget_held() -> Iterator[None]:
    """:func:`time_budget`'s alarm waits until the block has ended (e.g. a record is written whole).

    The handler, not a signal mask, defers it: torch's worker threads would
    take a process-wide ``SIGALRM`` that the main thread blocks.
    """
    _budget["held"] += 1
    try:
        yield
    finally:
        _budget["held"] -= 1
    if not _budget["held"] and _budget["pending"]:
        _budget["pending"] = False
        raise BudgetSpent()
