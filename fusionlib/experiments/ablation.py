"""Chapter 6b's ablation: which of UNITER's pretraining tasks help (the rows of UNITER's Table 2).

Each row of :data:`ABLATION_ROWS` pretrains the book's UNITER
(:func:`fusionlib.experiments.pretrain.train_pretraining`) with a subset of
UNITER's task mix, then fine-tunes it on the low-label VQA set and scores it
on the test split. Every row runs the same recipe: the same steps, batch,
learning rate and MLM-alone first phase, so rows differ in what they train,
not in how long. The rows, in order:

=========================  ==================================================
``none``                   no pretraining: a fresh encoder
``MLM``                    masked words alone
``MLM+ITM``                and image-text matching (no WRA)
``MLM+ITM+MRC-kl``         and masked-region classification (KL)
``+MRFR``                  and masked-region feature regression: UNITER's full mix, no WRA
``+WRA``                   with word-region alignment on ITM steps: the book's UNITER (chapter 6)
``+WRA, joint masking``    words and regions masked together instead of one modality per task
=========================  ==================================================

* :func:`ablation_spec` -- what one (row, seed) run depends on (its fingerprint's input);
* :func:`run_ablation` -- pretrain, fine-tune and score one (row, seed): one record;
* :func:`records_path`, :func:`read_records`, :func:`current_records` -- the records ``scripts/ablation.py``
  appended to ``results/06b_ablation.jsonl``, and those today's code would reproduce;
* :func:`summarise`, :func:`row_effects` -- mean and range over seeds per row, and
  each row against the one before it;
* :data:`PAPER_TABLE_2`, :func:`paper_changes` -- the paper's row for each of ours, and
  its Meta-Sum change against the row it adds to.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import types
from typing import Any, Iterable, Mapping

import torch

from fusionlib import checkpoints, runtime
from fusionlib.checkpoints import fingerprint
from fusionlib.experiments import pretrain
from fusionlib.experiments.pretrain import PretrainData, QuestionData
from fusionlib.experiments.world import BookWorld
from fusionlib.metrics import mean_range
from fusionlib.models import uniter

__all__ = [
    "AblationRow",
    "ABLATION_ROWS",
    "ABLATION_SEEDS",
    "PaperRow",
    "PAPER_TABLE_2",
    "paper_changes",
    "VQA_KEYS",
    "ablation_spec",
    "run_ablation",
    "records_path",
    "read_records",
    "current_records",
    "summarise",
    "row_effects",
]

MODEL = "uniter"
LABELS = "low"  # pretraining is for scarce labels: every row fine-tunes on a tenth of the images
VQA_KEYS = ("accuracy", "relational_accuracy", "non_relational_accuracy")
ABLATION_SEEDS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class AblationRow:
    """One row of chapter 6b's ablation: which of UNITER's objectives it pretrains, and how.

    ``objectives`` are keys of :data:`fusionlib.models.uniter.UNITER_TASK_MIX`
    kept at their weights there (the others dropped), or ``None`` for no
    pretraining. ``against`` names the row this one is compared with in
    :func:`row_effects` (``None``: the baseline).
    """

    label: str
    objectives: tuple[str, ...] | None
    use_wra: bool = False
    masking: str = "conditional"
    against: str | None = None

    def __post_init__(self) -> None:
        if self.objectives is not None:
            unknown = sorted(set(self.objectives) - set(uniter.UNITER_TASK_MIX))
            if unknown or not self.objectives:
                raise ValueError(
                    f"objectives must be a non-empty subset of {sorted(uniter.UNITER_TASK_MIX)} "
                    f"or None, got {self.objectives!r}"
                )
        if self.masking not in uniter.MASKINGS:
            raise ValueError(f"masking must be one of {uniter.MASKINGS}, got {self.masking!r}")

    @property
    def pretrains(self) -> bool:
        """Whether the row pretrains at all (``none`` does not)."""
        return self.objectives is not None

    @property
    def trains_itm(self) -> bool:
        """Whether its ITM head is trained: retrieval ranks by that head, which untrained is chance."""
        return self.objectives is not None and "itm" in self.objectives

    def mix(self) -> dict[str, float] | None:
        """``{task: weight}`` after the MLM-alone phase: UNITER's mix less the dropped objectives.

        Built by :func:`fusionlib.experiments.pretrain.task_mix` with the
        dropped tasks set to 0, so the kept ones keep UNITER's weights and the
        5 : 1 share of captions and descriptions. ``None`` for ``none``.
        """
        if self.objectives is None:
            return None
        dropped = {
            f"{objective}@{texts}": 0
            for objective in uniter.UNITER_TASK_MIX
            if objective not in self.objectives
            for texts in pretrain.TEXT_KINDS
        }
        return pretrain.task_mix(MODEL, **dropped)

    def model_changes(self) -> dict[str, Any]:
        """The UNITER config fields it sets (:func:`fusionlib.experiments.pretrain.pretrain_config`)."""
        return {"use_wra": self.use_wra, "masking": self.masking}


_FULL = tuple(uniter.UNITER_TASK_MIX)

# UNITER's Table 2 adds one task at a time; WRA and conditional masking come last because they
# change how the full mix trains, not what it trains. Rows before +WRA train ITM without WRA.
# Read-only, so that a row cannot change between a record and the fingerprint it is checked against.
ABLATION_ROWS: Mapping[str, AblationRow] = types.MappingProxyType(
    {
        row.label: row
        for row in (
            AblationRow("none", None),
            AblationRow("MLM", ("mlm",), against="none"),
            AblationRow("MLM+ITM", ("mlm", "itm"), against="MLM"),
            AblationRow("MLM+ITM+MRC-kl", ("mlm", "itm", "mrc_kl"), against="MLM+ITM"),
            AblationRow("+MRFR", _FULL, against="MLM+ITM+MRC-kl"),
            AblationRow("+WRA", _FULL, use_wra=True, against="+MRFR"),
            # Against +WRA, not the row above: joint masking changes the book's UNITER in one thing.
            AblationRow(
                "+WRA, joint masking", _FULL, use_wra=True, masking="joint", against="+WRA"
            ),
        )
    }
)


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """The row of UNITER's Table 2 that one of ours repeats, and what it scored there."""

    number: int  # the paper's row number (L1 ... L14)
    tasks: str  # as the paper lists them
    meta_sum: float  # VQA + Flickr30K IR + TR + NLVR2 + RefCOCO+, UNITER-base
    against: int | None  # the paper row it is compared with in :func:`paper_changes`


# UNITER's Table 2 (Chen et al., ECCV 2020), in-domain pretraining on COCO and Visual Genome. Our
# joint-masking row keeps WRA, the paper's drops it: row 12 is compared with row 10, not 11.
PAPER_TABLE_2: Mapping[str, PaperRow] = types.MappingProxyType(
    {
        "none": PaperRow(1, "None", 314.34, None),
        "MLM": PaperRow(5, "MLM", 386.10, 1),
        "MLM+ITM": PaperRow(6, "MLM + ITM", 393.04, 5),
        "MLM+ITM+MRC-kl": PaperRow(9, "MLM + ITM + MRC-kl", 397.09, 6),
        "+MRFR": PaperRow(10, "MLM + ITM + MRC-kl + MRFR", 399.97, 9),
        "+WRA": PaperRow(11, "MLM + ITM + MRC-kl + MRFR + WRA", 400.93, 10),
        "+WRA, joint masking": PaperRow(
            12, "MLM + ITM + MRC-kl + MRFR, without conditional masking", 396.51, 10
        ),
    }
)


def paper_changes() -> dict[str, float]:
    """Per row of ours, the paper's Meta-Sum change against the paper row it is compared with."""
    by_number = {row.number: row for row in PAPER_TABLE_2.values()}
    return {
        label: row.meta_sum - by_number[row.against].meta_sum
        for label, row in PAPER_TABLE_2.items()
        if row.against is not None
    }


def _check_row(row: Any) -> AblationRow:
    if not isinstance(row, str) or row not in ABLATION_ROWS:
        raise ValueError(f"row must be one of {list(ABLATION_ROWS)}, got {row!r}")
    return ABLATION_ROWS[row]


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return seed


def _check_recipe(recipe: Any) -> str:
    if not isinstance(recipe, str) or recipe not in pretrain.PRETRAIN_RECIPES:
        raise ValueError(
            f"recipe must be one of {tuple(pretrain.PRETRAIN_RECIPES)}, got {recipe!r}"
        )
    return recipe


def _pretrain_spec(row: AblationRow, seed: int, book: BookWorld, recipe: str) -> dict | None:
    if not row.pretrains:
        return None
    return pretrain.pretrain_spec(
        MODEL, book, recipe, seed=seed, mix=row.mix(), model_changes=row.model_changes()
    )


def ablation_spec(row: str, seed: int, book: BookWorld, recipe: str) -> dict[str, Any]:
    """Everything one (row, seed) run of chapter 6b's ablation depends on: its fingerprint's input.

    Args:
        row: a key of :data:`ABLATION_ROWS`.
        seed: an int >= 0; it seeds pretraining and fine-tuning alike.
        book: the world the run trains on (:func:`fusionlib.experiments.load_book_world`).
        recipe: ``"smoke"``, ``"small"`` or ``"full"``.

    Returns ``{"pretrain": spec or None, "vqa": spec, "evaluate": str}``: the
    pretraining spec of :func:`fusionlib.experiments.pretrain.pretrain_spec`
    (``None`` for ``none``) and the low-label VQA spec of
    :func:`fusionlib.experiments.pretrain.vqa_spec`, which names the
    pretraining spec it starts from. The ``+WRA`` row's pretraining spec is
    that of the book's UNITER (chapter 6). The row's label is not part of it:
    two rows that trained the same would share their records.
    """
    definition, seed, recipe = _check_row(row), _check_seed(seed), _check_recipe(recipe)
    start = _pretrain_spec(definition, seed, book, recipe)
    return {
        "pretrain": start,
        "vqa": pretrain.vqa_spec(MODEL, book, recipe, LABELS, start, seed),
        "evaluate": (
            "test split: evaluate_vqa_model; retrieval_metrics by the pretraining model's ITM head; "
            "grounding_metrics of pretrained rows"
        ),
    }


def run_ablation(
    row: str,
    seed: int,
    book: BookWorld,
    data: PretrainData,
    questions: QuestionData,
    recipe: str,
    device: torch.device | str | None = None,
    progress: bool = True,
    checkpoint_dir: str | None = None,
    reuse_from: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Pretrain one row of chapter 6b's ablation with one seed, fine-tune it on low-label VQA, score it.

    Args:
        row: a key of :data:`ABLATION_ROWS`.
        seed: an int >= 0; the model is drawn after ``torch.manual_seed(seed)``, and fine-tuning uses it too.
        book: the world (:func:`fusionlib.experiments.load_book_world`).
        data: UNITER's pretraining data (:func:`fusionlib.experiments.pretrain.pretrain_data`).
        questions: UNITER's questions (:func:`fusionlib.experiments.pretrain.question_data`).
        recipe: ``"smoke"``, ``"small"`` or ``"full"``; ``data`` and ``questions`` must be built for it.
        device: where to train (default :func:`fusionlib.runtime.device`), the device ``data`` is on.
        progress: show progress bars.
        checkpoint_dir: with it, pretraining and fine-tuning save as they go under ``pretrain/``
            and ``finetune/`` there and resume from there; key it by the fingerprint.
        reuse_from: checkpoint roots searched (:func:`fusionlib.checkpoints.find_by_spec`) for a
            model whose spec is this run's pretraining or fine-tuning spec; one found is loaded,
            not trained again. Default: the committed ``checkpoints/``; ``()`` trains everything.
            Chapter 6's UNITER is the ``+WRA`` row's seed 0, and its low-label fine-tuning runs
            from scratch are the ``none`` row's seeds. A reused model is the stored one (float16
            weights, as the chapter loads it), and its seconds are those its record gives.

    Returns a record: ``row``, ``seed``, ``recipe``, ``fingerprint`` (of
    :func:`ablation_spec`), ``itm_trained`` and

    * ``metrics["vqa"]``: test ``accuracy``, ``relational_accuracy`` and
      ``non_relational_accuracy`` after low-label fine-tuning
      (:func:`fusionlib.experiments.pretrain.finetune_vqa`) from the pretrained
      encoder, or from scratch for ``none``;
    * ``metrics["retrieval"]``: ``{"identification" | "captions": {"model" |
      "chance" | "ceiling": {...}}}`` of
      :func:`fusionlib.experiments.pretrain.retrieval_metrics` on the test
      split, ranked by the pretraining model's ITM head (zero-shot). The
      ``none`` row scores a fresh model's head and the ``MLM`` row a head
      that was never trained (``itm_trained`` is False): both should sit at
      chance, which is what they are there to show;
    * ``metrics["probes"]`` (pretrained rows only): the test split's probes of
      :func:`fusionlib.experiments.pretrain.grounding_metrics`, without prefix;
    * ``seconds``: ``pretrain`` (0 for ``none``), ``finetune`` and ``evaluate``;
    * ``reused``: ``{"pretrain": name or None, "finetune": name or None}``, the
      checkpoints loaded instead of trained.
    """
    definition, seed, recipe = _check_row(row), _check_seed(seed), _check_recipe(recipe)
    device = runtime.device() if device is None else torch.device(device)
    spec = ablation_spec(row, seed, book, recipe)

    def state(part: str) -> str | None:
        return None if checkpoint_dir is None else os.path.join(checkpoint_dir, part)

    reused: dict[str, str | None] = {"pretrain": None, "finetune": None}

    def stored(part: str, stage: str) -> tuple[torch.nn.Module, float] | None:
        """The committed model trained to ``spec[part]`` and its training seconds, or None."""
        found = checkpoints.find_by_spec(spec[part], reuse_from) if spec[part] else None
        if found is None:
            return None
        record, root = found
        reused[stage] = record.name
        loaded, _, _ = checkpoints.load_checkpoint(record.name, root, map_location=device)
        return loaded.eval(), record.wall_seconds

    pretrained = stored("pretrain", "pretrain")  # spec["pretrain"] is None for ``none``
    if pretrained is not None:
        model, pretrain_seconds = pretrained
    elif definition.pretrains:
        model, _, pretrain_seconds = pretrain.train_pretraining(
            MODEL,
            book,
            data,
            recipe,
            seed=seed,
            mix=definition.mix(),
            model_changes=definition.model_changes(),
            device=device,
            checkpoint_dir=state("pretrain"),
            progress=progress,
        )
    else:
        # A fresh model with the book's config, drawn as a pretraining run would draw it: its ITM
        # head scores retrieval (chance), and VQA fine-tunes from scratch like the book's scratch runs.
        torch.manual_seed(seed)
        model = uniter.UniterForPretraining(pretrain.pretrain_config(MODEL, book, recipe))
        model = model.to(device).eval()
        pretrain_seconds = 0.0
    finetuned = stored("vqa", "finetune")
    if finetuned is not None:
        vqa, finetune_seconds = finetuned
    else:
        vqa, _, finetune_seconds = pretrain.finetune_vqa(
            MODEL,
            book,
            questions,
            recipe,
            LABELS,
            pretrained=model if definition.pretrains else None,
            seed=seed,
            device=device,
            checkpoint_dir=state("finetune"),
            progress=progress,
        )
    started = time.perf_counter()
    scores = pretrain.evaluate_vqa_model(vqa, questions)
    metrics: dict[str, Any] = {
        "vqa": {k: scores[k] for k in VQA_KEYS},
        "retrieval": pretrain.retrieval_metrics(model, book, data, "test"),
    }
    if definition.pretrains:
        metrics["probes"] = pretrain.grounding_metrics(model, data, "test", prefix="")
    return {
        "row": row,
        "seed": seed,
        "recipe": recipe,
        "fingerprint": fingerprint(spec),
        "itm_trained": definition.trains_itm,
        "metrics": metrics,
        "seconds": {
            "pretrain": float(pretrain_seconds),
            "finetune": float(finetune_seconds),
            "evaluate": time.perf_counter() - started,
        },
        "reused": reused,
    }


# ---------------------------------------------------------------------------
# Records: reading them back, and what they say
# ---------------------------------------------------------------------------


def records_path(recipe: str) -> str:
    """Where ``scripts/ablation.py`` keeps a recipe's records.

    ``results/06b_ablation.jsonl`` for the full recipe, the ones chapter 6b
    reads and the repository keeps; ``<cache>/ablation/06b_ablation_<recipe>.jsonl``
    for smaller ones, which are never committed.
    """
    recipe = _check_recipe(recipe)
    if recipe == "full":
        return os.path.join(runtime.repo_root(), "results", "06b_ablation.jsonl")
    return os.path.join(runtime.cache_dir(), "ablation", f"06b_ablation_{recipe}.jsonl")


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``scripts/ablation.py`` appends one per run), in file order."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a JSON record ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {record!r}")
            records.append(record)
    return records


def current_records(
    records: Iterable[Mapping[str, Any]], book: BookWorld, recipe: str
) -> list[dict[str, Any]]:
    """The records of ``recipe`` whose fingerprint matches today's :func:`ablation_spec`.

    A record from before a change to the recipe, the data or the model is
    left out; of two records of one (row, seed) the later one is kept. The
    result is in row order, then seed order: what :func:`summarise` reads.
    """
    recipe = _check_recipe(recipe)
    wanted: dict[tuple[str, int], str] = {}
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    for record in records:
        row, seed = record.get("row"), record.get("seed")
        if record.get("recipe") != recipe or row not in ABLATION_ROWS:
            continue
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            continue
        key = (row, seed)
        if key not in wanted:
            wanted[key] = fingerprint(ablation_spec(row, seed, book, recipe))
        if record.get("fingerprint") == wanted[key]:
            kept[key] = dict(record)
    order = list(ABLATION_ROWS)
    return [kept[k] for k in sorted(kept, key=lambda k: (order.index(k[0]), k[1]))]


def _scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of a nested dict, under its dotted path (``"retrieval.captions.model.t2i_R@1"``)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_scalars(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "shown": mean_range(values),
    }


def summarise(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row, the mean, lowest and highest value over seeds of each number in the records (chapter 6b).

    ``records`` are :func:`run_ablation`'s (as :func:`current_records` keeps
    them): one recipe, at most one record per (row, seed). Returns, in the
    order of :data:`ABLATION_ROWS` and for the rows that have records,
    ``{row: {"seeds": [...], "metrics": {key: stats}, "seconds": {key: stats}}}``
    where a key is a dotted path into ``record["metrics"]``
    (``"vqa.relational_accuracy"``, ``"retrieval.captions.model.truth_t2i_R@1"``)
    and ``stats`` is ``{"mean", "min", "max", "n", "shown"}``: ``n`` the seeds
    that have the key, ``shown`` the book's ``"mean (min–max)"``
    (:func:`fusionlib.metrics.mean_range`).
    """
    by_row: dict[str, dict[int, Mapping[str, Any]]] = {}
    recipes = set()
    for record in records:
        if not isinstance(record, Mapping):
            raise ValueError(f"records must be mappings, got {type(record).__name__}")
        row = _check_row(record.get("row")).label
        seed = _check_seed(record.get("seed"))
        if not isinstance(record.get("metrics"), Mapping):
            raise ValueError(
                f"record ({row!r}, seed {seed}) must have a 'metrics' mapping, "
                f"got {record.get('metrics')!r}"
            )
        recipes.add(record.get("recipe"))
        if seed in by_row.setdefault(row, {}):
            raise ValueError(
                f"records must hold one record per (row, seed), got two of ({row!r}, seed {seed}): "
                "keep today's with current_records"
            )
        by_row[row][seed] = record
    if len(recipes) > 1:
        raise ValueError(f"records must come from one recipe, got {sorted(map(str, recipes))}")
    summary = {}
    for row in ABLATION_ROWS:
        if row not in by_row:
            continue
        seeds = sorted(by_row[row])
        parts: dict[str, dict[str, Any]] = {}
        for part in ("metrics", "seconds"):
            values: dict[str, list[float]] = {}
            for seed in seeds:
                for key, value in _scalars(by_row[row][seed].get(part) or {}).items():
                    values.setdefault(key, []).append(value)
            # A NaN (a metric that could not be computed) has no mean: that key is left out rather
            # than the row.
            parts[part] = {
                key: _stats(v) for key, v in values.items() if not any(map(math.isnan, v))
            }
        summary[row] = {"seeds": seeds, **parts}
    return summary


def row_effects(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each row against the one it adds to (its ``against``): the change in mean, and is it real?

    ``summary`` is what :func:`summarise` returns. For every row whose
    comparison row is in it too, and every metric both have:
    ``{"change": mean of the row - mean of the other, "exceeds_spread":
    bool | None, "verdict": str}``. ``exceeds_spread`` is True when the two
    rows' ranges over seeds do not overlap (every seed of one beats every
    seed of the other), False when they do, and None when either row has a
    single seed: one seed has no spread to compare a change with, and the
    verdict says so instead of calling the change significant. Returns
    ``{row: {"against": other row, "seeds": (n, n_other), "metrics": {...}}}``.
    """
    out = {}
    for row, definition in ABLATION_ROWS.items():
        base = definition.against
        if row not in summary or base is None or base not in summary:
            continue
        mine, theirs = summary[row]["metrics"], summary[base]["metrics"]
        effects = {}
        for key in mine:
            if key not in theirs:
                continue
            a, b = mine[key], theirs[key]
            change = a["mean"] - b["mean"]
            if a["n"] < 2 or b["n"] < 2:
                exceeds, verdict = None, "one seed: no spread to judge the change by"
            else:
                exceeds = a["min"] > b["max"] or a["max"] < b["min"]
                verdict = (
                    "beyond the seeds' spread (the ranges do not overlap)"
                    if exceeds
                    else "within the seeds' spread (the ranges overlap)"
                )
            effects[key] = {"change": change, "exceeds_spread": exceeds, "verdict": verdict}
        out[row] = {
            "against": base,
            "seeds": (len(summary[row]["seeds"]), len(summary[base]["seeds"])),
            "metrics": effects,
        }
    return out
