"""``python -m fusionlib.bench train``: how fast the book's training steps run (chapter 7).

For each of the book's training recipes it times the **whole training
step** :func:`fusionlib.train.train` runs (``zero_grad``, the step function
under autocast, ``backward``, gradient clipping, the AdamW update and the
one read-back of the loss and gradient norm per step), in four variants:

* ``eager`` / ``compiled``: the model as is, or ``torch.compile(model)``
  (inductor, as ``TrainConfig(compile=True)`` does; on CPU inductor needs a C
  compiler, and a failure is recorded, not raised);
* ``fp32`` / ``bf16``: without autocast, or under bf16 autocast
  (``TrainConfig(amp=True)`` on CUDA, ``TrainConfig(cpu_amp=...)`` on CPU;
  :func:`fusionlib.runtime.cpu_bf16_support` says whether this CPU has native
  bf16, and the report records it).

Recipes (:data:`RECIPES`):

* ``ch03_cross_attention``: chapter 3's cross-attention model, ``full`` recipe
  (:func:`fusionlib.experiments.fusion.fusion_setups`), batch 512, the
  :func:`~fusionlib.experiments.fusion.answer_loss` step;
* ``vilbert_pretraining`` and ``uniter_pretraining``: ViLBERT and UNITER at
  the size chapter 7 compares them at (:class:`fusionlib.bench.models.MatchedSize`:
  hidden 256, 4 heads, ffn 1024, 16 tokens, 8 regions), with their
  ``pretraining_step``: ViLBERT's MLM + MRC-KL + ITM in one step, UNITER's
  mix (:data:`fusionlib.models.uniter.UNITER_TASK_MIX`: itm 2, mlm 2, mrfr 1,
  mrc_kl 1), whose timed unit is one step of each task in those proportions
  (six steps). Batch 32 on CPU (chapter 7's), 512 on CUDA (the batch of the
  GPU targets); ``--pretrain-batch`` changes it. ITM draws random other
  images as negatives (chapter 6's UNITER does; the truth-judged negatives
  need the world's facts, which a synthetic batch has not).

The batches are synthetic, in the shapes of the book's world (vocabulary
198, 10 answers, 15-token questions, 10 regions of 64 features for chapter 3)
and already on the device, as chapter 3's ``TensorBatches`` are: data
loading is not timed. Every variant trains its own copy of the same initial
weights with its own optimizer.

The variants of a recipe are timed interleaved, one step each per round
(:func:`fusionlib.bench.models.time_rounds`), so ratios compare steps that
ran moments apart; the report gives the median and quartiles of the time per
step, steps/s and samples/s, and the per-round speed-up of each variant over
``eager_fp32``. FLOPs per step are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (forward and backward, SDPA's
math backend; :func:`fusionlib.bench.models.step_flops`), giving GFLOP/s and,
on a GPU whose bf16 peak is known (:data:`fusionlib.bench.models.PEAK_BF16_FLOPS`),
the fraction of that peak. On a CPU the peak is reported as unknown: no
vendor figure applies to a shared, frequency-scaled virtual machine.

Results go to ``results/bench_train_<device>.json`` (``runtime.write_results``).
Timings are not tests: nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fusionlib import runtime
from fusionlib.bench import write_report
from fusionlib.bench.models import (
    MatchedSize,
    _cpu_name,
    _summary,
    peak_bf16_flops,
    ratio_summary,
    step_flops,
    synthetic_batch,
    time_rounds,
    uniter_config,
    vilbert_config,
)

__all__ = [
    "RECIPES",
    "VARIANTS",
    "Recipe",
    "build_recipe",
    "vqa_batch",
    "pretraining_batch",
    "TrainStep",
    "bench_train",
    "results_name",
    "main",
]

RECIPES = ("ch03_cross_attention", "vilbert_pretraining", "uniter_pretraining")
VARIANTS = ("eager_fp32", "eager_bf16", "compiled_fp32", "compiled_bf16")
LABELS = {
    "ch03_cross_attention": "chapter 3 cross-attention (full recipe)",
    "vilbert_pretraining": "ViLBERT pretraining (MLM + MRC-KL + ITM)",
    "uniter_pretraining": "UNITER pretraining (task mix)",
}
# The default world's sizes (checkpoints/manifest.json, ch03 specs; the region cache's shapes).
WORLD_VOCAB, WORLD_ANSWERS, WORLD_REGION_DIM = 198, 10, 64
WORLD_QUESTION_TOKENS, WORLD_REGIONS, WORLD_REGION_CLASSES = 15, 10, 13
CH03_BATCH = 512
PRETRAIN_BATCH = {"cpu": 32, "cuda": 512}
# A size for tests and CI: every recipe in milliseconds per step; no dropout, so that a compiled
# run can be compared with an eager one step for step (inductor draws its own dropout masks).
TINY = MatchedSize(
    hidden_size=16,
    num_heads=2,
    ffn_size=32,
    batch_size=4,
    text_len=6,
    num_regions=3,
    dropout=0.0,
)


@dataclasses.dataclass
class Recipe:
    """One training recipe: a model factory, its batch and the tasks one timed call steps through."""

    name: str
    batch_size: int
    make_model: Callable[[], nn.Module]  # a fresh model, the same weights every call
    step_fn: Callable[[nn.Module, dict[str, Tensor], str], dict[str, Any]]
    batch: dict[str, Tensor]
    tasks: tuple[str, ...]  # one training step per entry (UNITER: its mix, in proportion)
    details: dict[str, Any]

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)


def vqa_batch(
    batch_size: int,
    tokens: int = WORLD_QUESTION_TOKENS,
    regions: int = WORLD_REGIONS,
    vocab_size: int = WORLD_VOCAB,
    num_answers: int = WORLD_ANSWERS,
    region_dim: int = WORLD_REGION_DIM,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Tensor]:
    """A chapter-3 batch: standardised regions (z-scores), questions with padding, an answer each."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, tokens - 5), tokens + 1, (batch_size,), generator=g)
    attention_mask = torch.arange(tokens)[None] < lengths[:, None]
    ids = torch.randint(5, vocab_size, (batch_size, tokens), generator=g).masked_fill(
        ~attention_mask, 0
    )
    ids[:, 0] = 2
    counts = torch.randint(max(1, regions - 4), regions + 1, (batch_size,), generator=g)
    region_mask = torch.arange(regions)[None] < counts[:, None]
    batch = {
        "input_ids": ids,
        "attention_mask": attention_mask,
        "region_feats": torch.randn(batch_size, regions, region_dim, generator=g),
        "region_loc5": torch.randn(batch_size, regions, 5, generator=g),
        "region_mask": region_mask,
        "answer": torch.randint(0, num_answers, (batch_size,), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def pretraining_batch(
    size: MatchedSize,
    num_region_classes: int = 16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Tensor]:
    """:func:`fusionlib.bench.models.synthetic_batch` plus what pretraining reads: soft labels, image ids."""
    batch = synthetic_batch(size, "cpu", seed)
    g = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(size.batch_size, size.num_regions, num_region_classes, generator=g)
    batch["region_soft_labels"] = logits.softmax(-1)
    batch["image_index"] = torch.arange(size.batch_size)  # every pair its own image (ITM negatives)
    return {k: v.to(device) for k, v in batch.items()}


def _seeded(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        state = torch.get_rng_state()
        try:
            torch.manual_seed(seed)
            return factory()
        finally:
            torch.set_rng_state(state)

    return make


def build_recipe(
    name: str,
    device: torch.device | str = "cpu",
    tiny: bool = False,
    batch_size: int | None = None,
) -> Recipe:
    """The recipe ``name`` (:data:`RECIPES`) on ``device``; ``tiny``: :data:`TINY` sizes (tests, CI)."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {name!r}")
    device = torch.device(device)
    if name == "ch03_cross_attention":
        from fusionlib.experiments.fusion import answer_loss, fusion_setups
        from fusionlib.models import build_model

        recipe = "smoke" if tiny else "full"
        kind, config = fusion_setups(recipe, WORLD_VOCAB, WORLD_ANSWERS, WORLD_REGION_DIM)[
            "cross_attention"
        ]
        batch_size = batch_size or (TINY.batch_size if tiny else CH03_BATCH)
        tokens, regions = (TINY.text_len, TINY.num_regions) if tiny else (15, 10)
        return Recipe(
            name,
            batch_size,
            _seeded(lambda: build_model(kind, config)),
            answer_loss,
            vqa_batch(batch_size, tokens, regions, device=device),
            ("train",),
            {"model": kind, "fusion_recipe": recipe, "tokens": tokens, "regions": regions},
        )
    size = TINY if tiny else MatchedSize()
    size = dataclasses.replace(
        size, batch_size=batch_size or (size.batch_size if tiny else PRETRAIN_BATCH[device.type])
    )
    details = {"size": size.to_dict()}
    if name == "vilbert_pretraining":
        from fusionlib.models.vilbert import ViLBERTForPretraining, pretraining_step

        config = dataclasses.replace(vilbert_config(size), itm_negatives="random")
        return Recipe(
            name,
            size.batch_size,
            _seeded(lambda: ViLBERTForPretraining(config)),
            pretraining_step,
            pretraining_batch(size, config.num_region_classes, device),
            ("train",),
            details,
        )
    from fusionlib.models.uniter import UNITER_TASK_MIX, UniterForPretraining, pretraining_step

    config = dataclasses.replace(uniter_config(size), itm_negatives="random")
    tasks = tuple(t for t, n in UNITER_TASK_MIX.items() for _ in range(int(n)))
    return Recipe(
        name,
        size.batch_size,
        _seeded(lambda: UniterForPretraining(config)),
        lambda model, batch, task: pretraining_step(model, batch, task),
        pretraining_batch(size, config.num_region_classes, device),
        tasks,
        {**details, "task_mix": dict(UNITER_TASK_MIX)},
    )


class TrainStep:
    """The training step of :func:`fusionlib.train.train`, on a fixed batch; ``step()`` runs it once per task.

    ``compiled``: the step function gets ``torch.compile(model)``; ``bf16``:
    it runs under :func:`fusionlib.runtime.autocast` (CUDA, or CPU with
    ``cpu=True``). The optimizer is :func:`fusionlib.train.make_optimizer`'s
    AdamW (fused on CUDA), at a small constant rate so that hundreds of steps
    on one batch stay finite.
    """

    def __init__(
        self, recipe: Recipe, device: torch.device, compiled: bool, bf16: bool, seed: int = 0
    ):
        from fusionlib.train import TrainConfig, make_optimizer

        self.recipe, self.device, self.bf16 = recipe, device, bf16
        self.model = recipe.make_model().to(device).train()
        self.run_model = torch.compile(self.model) if compiled else self.model
        config = TrainConfig(steps=1, lr=1e-4)
        self.optimizer = make_optimizer(self.model, config, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.max_norm = config.grad_clip
        self.generator = torch.Generator().manual_seed(seed)
        self.losses: list[float] = []

    def _autocast(self):
        return runtime.autocast(self.device, enabled=self.bf16, cpu=self.bf16)

    def forward_backward(self) -> None:
        """One step's forward and backward per task, no update (what the FLOP counter reads)."""
        for task in self.recipe.tasks:
            with self._autocast():
                loss = self.recipe.step_fn(self.run_model, self.recipe.batch, task)["loss"]
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for task in self.recipe.tasks:
            # The masks and negatives of a pretraining step come from the global generator.
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=self.generator)))
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss = self.recipe.step_fn(self.run_model, self.recipe.batch, task)["loss"]
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
            self.optimizer.step()
            values = torch.stack([loss.detach().float(), norm.float()]).tolist()
            self.losses.append(values[0])


def _variants(names: tuple[str, ...]) -> list[tuple[str, bool, bool]]:
    out = []
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"variants must be among {VARIANTS}, got {name!r}")
        mode, precision = name.split("_")
        out.append((name, mode == "compiled", precision == "bf16"))
    return out


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def bench_recipe(
    recipe: Recipe,
    device: torch.device,
    variants: tuple[str, ...] = VARIANTS,
    repeats: int = 10,
    warmup: int = 2,
    say: Callable[..., None] = print,
) -> dict[str, Any]:
    """Time ``variants`` of ``recipe`` interleaved; its report (see :func:`bench_train`)."""
    steps_per_call = len(recipe.tasks)
    contenders: dict[str, TrainStep] = {}
    out: dict[str, Any] = {
        "label": recipe.label,
        "batch_size": recipe.batch_size,
        "steps_per_call": steps_per_call,
        "tasks": list(recipe.tasks),
        **recipe.details,
        "variants": {},
        "errors": {},
    }
    for name, compiled, bf16 in _variants(variants):
        started = time.perf_counter()
        try:
            contender = TrainStep(recipe, device, compiled, bf16)
            contender.step()  # compiles (the first call of each task) and checks it runs
            runtime.synchronize(device)
        except Exception as error:  # noqa: BLE001 - inductor needs a C compiler (CPU) or triton (CUDA)
            out["errors"][name] = _first_line(error)
            say(f"  {name}: failed ({out['errors'][name]})")
            torch._dynamo.reset()
            continue
        contenders[name] = contender
        out["variants"][name] = {"first_call_seconds": time.perf_counter() - started}
    if not contenders:
        return out
    flops: dict[bool, int] = {}
    for name, c in contenders.items():
        if c.bf16 not in flops:
            # Counted on an eager copy: the arithmetic is the algorithm's, compiled or not.
            flops[c.bf16] = step_flops(TrainStep(recipe, device, False, c.bf16).forward_backward)
        out["variants"][name]["flops_per_call"] = flops[c.bf16]
    samples = time_rounds(
        {name: c.step for name, c in contenders.items()},
        repeats=repeats,
        warmup=warmup,
        sync=lambda: runtime.synchronize(device),
    )
    peak = peak_bf16_flops(device)
    base = "eager_fp32" if "eager_fp32" in samples else next(iter(samples))
    for name, s in samples.items():
        seconds = statistics.median(s) / steps_per_call  # per training step
        row = out["variants"][name]
        per_step = row["flops_per_call"] / steps_per_call
        last_loss = contenders[name].losses[-1]
        row.update({k: v / steps_per_call for k, v in _summary(s).items()})  # ms per step
        row.update(
            {
                "steps_per_s": 1.0 / seconds,
                "samples_per_s": recipe.batch_size / seconds,
                "gflop_per_step": per_step / 1e9,
                "gflop_per_s": per_step / seconds / 1e9,
                "fraction_of_bf16_peak": per_step / seconds / peak if peak else None,
                "speedup_vs_" + base: ratio_summary(samples[base], s),
                "final_loss": last_loss if math.isfinite(last_loss) else None,
            }
        )
    out["baseline"] = base
    return out


def results_name(device: torch.device | str) -> str:
    """``bench_train_<device type>``: the results file :func:`main` writes (``results/<name>.json``)."""
    return f"bench_train_{torch.device(device).type}"


def bench_train(
    recipes: tuple[str, ...] = RECIPES,
    variants: tuple[str, ...] = VARIANTS,
    repeats: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    device: str | None = None,
    tiny: bool = False,
    ch03_batch: int | None = None,
    pretrain_batch: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run every recipe's variants; the report :func:`main` writes.

    Keys: ``device``, ``device_name``, ``threads``, ``versions``,
    ``cpu_bf16`` (``{"native": bool, "why": str}`` on CPU), ``peak_bf16_flops``
    (None: unknown), ``peak_note``, ``repeats``, ``date`` and ``recipes``:
    per recipe its batch, tasks, sizes and ``variants``: per variant
    ``median_ms`` / ``q25_ms`` / ``q75_ms`` per training step, ``steps_per_s``,
    ``samples_per_s``, ``gflop_per_step``, ``gflop_per_s``,
    ``fraction_of_bf16_peak``, ``speedup_vs_eager_fp32`` (per-round ratio:
    median, quartiles), ``first_call_seconds`` (with compiling) and
    ``final_loss``; ``errors`` names the variants that could not run.
    """
    from fusionlib.bench.models import _versions

    dev = runtime.device(device)
    say = print if verbose else (lambda *a, **k: None)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        native, why = runtime.cpu_bf16_support() if dev.type == "cpu" else (None, "")
        peak = peak_bf16_flops(dev)
        report: dict[str, Any] = {
            "device": dev.type,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(),
            "versions": _versions(),
            "cpu_bf16": {"native": native, "why": why} if dev.type == "cpu" else None,
            "peak_bf16_flops": peak,
            "peak_note": (
                "dense bf16 tensor-core peak from the vendor's data sheet"
                if peak
                else "peak unknown: no vendor figure applies to this device"
            ),
            "tiny": tiny,
            "repeats": repeats,
            "warmup": warmup,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "recipes": {},
        }
        say(
            f"{dev.type} ({report['device_name']}), {report['threads']} threads | torch "
            f"{torch.__version__}"
            + (f" | native bf16: {native} ({why})" if dev.type == "cpu" else "")
        )
        for name in recipes:
            recipe = build_recipe(
                name,
                dev,
                tiny=tiny,
                batch_size=ch03_batch if name == "ch03_cross_attention" else pretrain_batch,
            )
            say(f"\n{recipe.label}: batch {recipe.batch_size}, tasks {list(recipe.tasks)}")
            row = bench_recipe(recipe, dev, variants, repeats, warmup, say)
            report["recipes"][name] = row
            _print_recipe(row, say)
        report["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        return report
    finally:
        torch.set_num_threads(old_threads)


def _print_recipe(row: dict[str, Any], say: Callable[..., None]) -> None:
    base = row.get("baseline")
    say(
        f"  {'variant':<14} {'ms/step':>9} {'IQR ms':>17} {'steps/s':>8} {'samples/s':>10} "
        f"{'GFLOP/s':>8} {'peak':>6} {'speed-up':>16} {'1st call s':>10}"
    )
    for name, v in row["variants"].items():
        if "median_ms" not in v:
            continue
        r = v["speedup_vs_" + base]
        frac = "n/a" if v["fraction_of_bf16_peak"] is None else f"{v['fraction_of_bf16_peak']:.1%}"
        say(
            f"  {name:<14} {v['median_ms']:>9.2f} {v['q25_ms']:>8.2f}-{v['q75_ms']:<8.2f} "
            f"{v['steps_per_s']:>8.2f} {v['samples_per_s']:>10.0f} {v['gflop_per_s']:>8.1f} "
            f"{frac:>6} {r['median']:>5.2f}x [{r['q25']:.2f}-{r['q75']:.2f}] "
            f"{v['first_call_seconds']:>10.1f}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m fusionlib.bench train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed rounds (each times every variant once)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--ch03-batch", type=int, default=None, help=f"chapter 3's batch (default {CH03_BATCH})"
    )
    parser.add_argument(
        "--pretrain-batch",
        type=int,
        default=None,
        help=f"ViLBERT's and UNITER's batch (default {PRETRAIN_BATCH})",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches (tests, CI)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default: results/bench_train_<device>.json)"
    )
    args = parser.parse_args(argv)
    for flag in ("threads", "ch03_batch", "pretrain_batch"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    report = bench_train(
        tuple(args.recipes),
        tuple(args.variants),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        tiny=args.tiny,
        ch03_batch=args.ch03_batch,
        pretrain_batch=args.pretrain_batch,
    )
    path = write_report(report, results_name(report["device"]), args.out)
    print(f"\nwrote {path}")
    return report
