"""``python -m fusionlib.bench models``: fusionlib's ViLBERT and UNITER against the peers (chapter 7).

The peers are the implementations a reader would otherwise pick:
transformers' ``LxmertModel`` (two streams, like ViLBERT) and
``VisualBertModel`` (one stream, like UNITER). Both are built from configs
with random weights (nothing is downloaded) at a **matched size**
(:class:`MatchedSize`): the same hidden size, heads, feed-forward width,
layer counts, dropout, vocabulary, region feature size, text length, region
count and batch. The script prints every model's parameter count and its
FLOPs per step, so the match can be checked rather than trusted.

Layer counts: LXMERT's ``l_layers`` language, ``r_layers`` vision and
``x_layers`` cross-modality layers become ViLBERT's text layers, visual
layers and co-attention layers one for one (:func:`vilbert_config`):
``T0 T1 V0 C0 C1`` for LXMERT's ``L0 L1 R0 X0 X1``. An LXMERT cross layer
also holds a self-attention per stream, which ViLBERT keeps in its ordinary
layers; ``same_attention=True`` gives the ViLBERT with as many
self-attention sublayers as LXMERT (two more layers per stream, so more
FLOPs than LXMERT). Both are measured; the headline is the first.

What is measured, per model, in one process and interleaved (A B A B ...,
:func:`fusionlib.bench.time_interleaved`): one training step's forward and
backward (train mode, dropout on, loss = the sum of the means of every
output), its peak memory (CUDA: ``torch.cuda.max_memory_allocated`` above
the weights; CPU: the bytes autograd saves for the backward pass, which is
what grows with batch and length) and its FLOPs
(``torch.utils.flop_counter``). Each round times every model once, so the
ratio of two models *within a round* is fair even on a shared machine; the
reported ratio is the median of the per-round ratios with its quartiles.

Also: the attention comparison of chapter 1 (from scratch vs fused vs
``nn.MultiheadAttention``, :mod:`fusionlib.bench.attention`), and on CUDA:
fp32 vs bf16 autocast, the SDPA backends (flash, memory-efficient, math)
under ``torch.nn.attention.sdpa_kernel``, and ``torch.compile``, with
throughput in samples/s and the fraction of the GPU's peak bf16 matrix
throughput one step reaches.

Results go to ``results/bench_models_<device>.json`` (device, versions and
every number). Timings are not tests: nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import statistics
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from fusionlib import runtime
from fusionlib.bench import time_interleaved, write_report

__all__ = [
    "MatchedSize",
    "vilbert_config",
    "uniter_config",
    "lxmert_model",
    "visualbert_model",
    "synthetic_batch",
    "build_contenders",
    "Contender",
    "saved_activation_bytes",
    "step_flops",
    "time_rounds",
    "ratio_summary",
    "attention_flops",
    "attention_cost",
    "bench_models",
    "peak_bf16_flops",
    "main",
]

PAIRS = (("vilbert", "lxmert"), ("vilbert_same_attention", "lxmert"), ("uniter", "visualbert"))
LABELS = {
    "vilbert": "fusionlib ViLBERT",
    "vilbert_same_attention": "fusionlib ViLBERT (same attention sublayers)",
    "lxmert": "transformers LxmertModel",
    "uniter": "fusionlib UNITER",
    "visualbert": "transformers VisualBertModel",
}

# Dense bf16 tensor-core peaks from the vendor's data sheets (no sparsity), FLOP/s.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


@dataclasses.dataclass(frozen=True)
class MatchedSize:
    """One size for all four models (chapter 7). Defaults: the size chapter 7 compares the peers at.

    ``lxmert_layers = (language, vision, cross)``; ``single_stream_layers``
    is VisualBERT's and UNITER's depth. ``vocab_size`` 512 and
    ``region_dim`` 64 are the book's world (tokenizer, detector features).
    """

    hidden_size: int = 256
    num_heads: int = 4
    ffn_size: int = 1024
    batch_size: int = 32
    text_len: int = 16
    num_regions: int = 8
    lxmert_layers: tuple[int, int, int] = (2, 1, 2)
    single_stream_layers: int = 4
    vocab_size: int = 512
    region_dim: int = 64
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_heads",
            "ffn_size",
            "batch_size",
            "text_len",
            "num_regions",
            "single_stream_layers",
            "vocab_size",
            "region_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}"
            )
        layers = tuple(self.lxmert_layers)
        if (
            len(layers) != 3
            or not all(isinstance(n, int) and n >= 0 for n in layers)
            or layers[2] == 0
        ):
            raise ValueError(
                f"lxmert_layers must be (language >= 0, vision >= 0, cross >= 1), got {self.lxmert_layers!r}"
            )
        object.__setattr__(self, "lxmert_layers", layers)
        if self.vocab_size <= 5:
            raise ValueError(f"vocab_size must exceed the 5 special tokens, got {self.vocab_size}")
        if self.text_len < 2:
            raise ValueError(f"text_len must be >= 2 ([CLS] and a word), got {self.text_len}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


# ---------------------------------------------------------------------------
# The four models at one size
# ---------------------------------------------------------------------------


def vilbert_config(size: MatchedSize, same_attention: bool = False):
    """The :class:`~fusionlib.models.vilbert.ViLBERTConfig` matching LXMERT's ``(language, vision, cross)``.

    ``same_attention=False``: ``language`` text layers, ``vision`` visual
    layers, then ``cross`` co-attention layers (``T0 T1 V0 C0 C1``).
    ``same_attention=True``: a text and a visual layer after each co-TRM but
    the last, and one of each after it (``T0 T1 V0 C0 | T2 V1 C1 | V2 T3``),
    so each stream has as many self-attention sublayers as in LXMERT.
    """
    from fusionlib.models.vilbert import ViLBERTConfig

    lang, vis, cross = size.lxmert_layers
    extra = cross if same_attention else 0
    step = 1 if same_attention else 0
    return ViLBERTConfig(
        vocab_size=size.vocab_size,
        num_region_classes=16,
        region_dim=size.region_dim,
        text_hidden_size=size.hidden_size,
        text_num_layers=lang + extra,
        text_num_heads=size.num_heads,
        text_ffn_size=size.ffn_size,
        visual_hidden_size=size.hidden_size,
        visual_num_layers=vis + extra,
        visual_num_heads=size.num_heads,
        visual_ffn_size=size.ffn_size,
        bi_hidden_size=size.hidden_size,
        bi_num_heads=size.num_heads,
        text_layer_ids=tuple(lang + step * k for k in range(cross)),
        visual_layer_ids=tuple(vis + step * k for k in range(cross)),
        dropout=size.dropout,
        max_text_len=max(size.text_len, 40),
    )


def uniter_config(size: MatchedSize):
    """The :class:`~fusionlib.models.uniter.UniterConfig` matching VisualBERT's depth and widths."""
    from fusionlib.models.uniter import UniterConfig

    return UniterConfig(
        vocab_size=size.vocab_size,
        num_region_classes=16,
        region_dim=size.region_dim,
        hidden_size=size.hidden_size,
        num_layers=size.single_stream_layers,
        num_heads=size.num_heads,
        ffn_size=size.ffn_size,
        dropout=size.dropout,
        max_text_len=max(size.text_len, 40),
    )


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def lxmert_model(size: MatchedSize) -> nn.Module:
    """transformers' ``LxmertModel`` at ``size``, random weights (built from a config, never downloaded)."""
    from transformers import LxmertConfig, LxmertModel

    _quiet_transformers()
    lang, vis, cross = size.lxmert_layers
    config = LxmertConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        num_attention_heads=size.num_heads,
        intermediate_size=size.ffn_size,
        l_layers=lang,
        r_layers=vis,
        x_layers=cross,
        visual_feat_dim=size.region_dim,
        hidden_dropout_prob=size.dropout,
        attention_probs_dropout_prob=size.dropout,
        max_position_embeddings=max(size.text_len, 40),
    )
    return LxmertModel(config)


def visualbert_model(size: MatchedSize) -> nn.Module:
    """transformers' ``VisualBertModel`` at ``size``, random weights (built from a config, never downloaded)."""
    from transformers import VisualBertConfig, VisualBertModel

    _quiet_transformers()
    config = VisualBertConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.single_stream_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=size.ffn_size,
        visual_embedding_dim=size.region_dim,
        hidden_dropout_prob=size.dropout,
        attention_probs_dropout_prob=size.dropout,
        max_position_embeddings=max(size.text_len, 40),
        pad_token_id=0,
    )
    return VisualBertModel(config)


def synthetic_batch(
    size: MatchedSize, device: torch.device | str = "cpu", seed: int = 0
) -> dict[str, Tensor]:
    """A dense batch at ``size``: every token and region real, ``[CLS]`` (id 2) first.

    Keys: fusionlib's batch keys (``input_ids``, ``attention_mask``,
    ``region_feats``, ``region_loc5``, ``region_loc7``, ``region_mask``,
    ``image_feats``) plus ``region_loc4`` (LXMERT's box input ``x1, y1, x2, y2``).
    """
    g = torch.Generator().manual_seed(seed)
    B, T, R = size.batch_size, size.text_len, size.num_regions
    ids = torch.randint(5, size.vocab_size, (B, T), generator=g)
    ids[:, 0] = 2
    xy = torch.rand(B, R, 2, generator=g) * 0.7
    wh = 0.05 + torch.rand(B, R, 2, generator=g) * 0.25
    box = torch.cat([xy, xy + wh], dim=-1)  # (B, R, 4) in [0, 1]
    area = wh[..., :1] * wh[..., 1:]
    feats = torch.randn(B, R, size.region_dim, generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones(B, T, dtype=torch.bool),
        "region_feats": feats,
        "region_loc4": box,
        "region_loc5": torch.cat([box, area], -1),
        "region_loc7": torch.cat([box, wh, area], -1),
        "region_mask": torch.ones(B, R, dtype=torch.bool),
        "image_feats": feats.mean(dim=1),
    }
    return {k: v.to(device) for k, v in batch.items()}


@dataclasses.dataclass
class Contender:
    """One model in the race: its module, its step (forward + backward), its label."""

    name: str
    model: nn.Module
    forward: Callable[[], list[Tensor]]  # the outputs whose means are summed into the loss

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def loss(self) -> Tensor:
        return sum(o.float().mean() for o in self.forward())

    def step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.loss().backward()


def build_contenders(
    size: MatchedSize,
    device: torch.device | str = "cpu",
    names: tuple[str, ...] | None = None,
    batch: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> dict[str, Contender]:
    """The models of :data:`LABELS` at ``size`` on ``device``, in train mode, each reading the same ``batch``."""
    from fusionlib.models.uniter import UniterModel
    from fusionlib.models.vilbert import ViLBERT

    device = torch.device(device)
    names = tuple(LABELS) if names is None else tuple(names)
    unknown = [n for n in names if n not in LABELS]
    if unknown:
        raise ValueError(f"names must be among {tuple(LABELS)}, got {unknown}")
    b = synthetic_batch(size, device, seed) if batch is None else batch
    text_mask, region_mask = b["attention_mask"], b["region_mask"]
    # The transformers models take integer masks (1 = real), as their tokenizers return them.
    text_mask_int, region_mask_int = text_mask.long(), region_mask.long()
    out: dict[str, Contender] = {}
    for name in names:
        torch.manual_seed(seed)
        if name.startswith("vilbert"):
            model = ViLBERT(
                vilbert_config(size, same_attention=name.endswith("same_attention"))
            ).to(device)

            def forward(m=model):
                o = m(b)
                return [o.text_hidden, o.visual_hidden, o.pooled_text, o.pooled_visual]
        elif name == "uniter":
            model = UniterModel(uniter_config(size)).to(device)

            def forward(m=model):
                o = m(b)
                return [o.sequence, o.pooled]
        elif name == "lxmert":
            model = lxmert_model(size).to(device)

            def forward(m=model):
                o = m(
                    input_ids=b["input_ids"],
                    attention_mask=text_mask_int,
                    visual_feats=b["region_feats"],
                    visual_pos=b["region_loc4"],
                    visual_attention_mask=region_mask_int,
                )
                return [o.language_output, o.vision_output, o.pooled_output]
        else:
            model = visualbert_model(size).to(device)

            def forward(m=model):
                o = m(
                    input_ids=b["input_ids"],
                    attention_mask=text_mask_int,
                    visual_embeds=b["region_feats"],
                    visual_attention_mask=region_mask_int,
                )
                return [o.last_hidden_state, o.pooler_output]

        model.train()
        out[name] = Contender(name, model, forward)
    return out


# ---------------------------------------------------------------------------
# Measuring: time, memory, FLOPs
# ---------------------------------------------------------------------------


def saved_activation_bytes(fn: Callable[[], Any], exclude: nn.Module | None = None) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``fn()`` runs (CPU memory figure).

    Each storage is counted once (views share it); the weights of ``exclude``
    are left out (they exist whether or not we train). This is the memory
    that grows with batch size and sequence length, the part a GPU runs out of.
    """
    skip = (
        {p.untyped_storage().data_ptr() for p in exclude.parameters()}
        if exclude is not None
        else set()
    )
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip:
                seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def step_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` counted by ``torch.utils.flop_counter`` (matrix products and attention, forward and backward).

    Counted with SDPA's math backend, whose matrix products the counter sees
    on every device (PyTorch's fused CPU kernel is not in its tables): the
    count is the algorithm's, whichever kernel runs it when timed.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_rounds(
    fns: dict[str, Callable[[], object]],
    repeats: int = 10,
    warmup: int = 2,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds of every call, round by round: ``{name: [round 0, round 1, ...]}``.

    Each round is one :func:`fusionlib.bench.time_interleaved` pass (every
    function once, in turn), so ``a[i] / b[i]`` compares two functions that
    ran moments apart on the same machine state.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup > 0:
        time_interleaved(fns, repeats=1, warmup=warmup - 1, sync=sync)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, seconds in time_interleaved(fns, repeats=1, warmup=0, sync=sync).items():
            samples[name].append(seconds)
    return samples


def ratio_summary(slow: list[float], fast: list[float]) -> dict[str, float]:
    """``slow / fast`` per round: median, quartiles, min and max (a ratio > 1: ``fast`` is faster)."""
    if len(slow) != len(fast) or not slow:
        raise ValueError(f"need as many rounds of each, got {len(slow)} and {len(fast)}")
    ratios = sorted(s / f for s, f in zip(slow, fast))
    q = (
        statistics.quantiles(ratios, n=4, method="inclusive")
        if len(ratios) > 1
        else [ratios[0]] * 3
    )
    return {
        "median": statistics.median(ratios),
        "q25": q[0],
        "q75": q[2],
        "min": ratios[0],
        "max": ratios[-1],
        "rounds": len(ratios),
    }


def _summary(samples: list[float]) -> dict[str, float]:
    q = (
        statistics.quantiles(samples, n=4, method="inclusive")
        if len(samples) > 1
        else [samples[0]] * 3
    )
    return {
        "median_ms": 1e3 * statistics.median(samples),
        "q25_ms": 1e3 * q[0],
        "q75_ms": 1e3 * q[2],
    }


def _peak_cuda_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def peak_bf16_flops(device: torch.device | str | None = None) -> float | None:
    """The GPU's dense bf16 matrix peak in FLOP/s from :data:`PEAK_BF16_FLOPS`, or None (CPU, unknown GPU)."""
    device = runtime.device(None if device is None else str(device))
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


# ---------------------------------------------------------------------------
# The cost of fusion: single-stream vs two-stream attention
# ---------------------------------------------------------------------------


def attention_flops(num_text: int, num_regions: int, hidden: int, kind: str) -> int:
    r"""FLOPs of the attention *scores and mixing* of one layer, forward only (chapter 7).

    ``single``: one self-attention over the joint sequence of
    :math:`n = T + V` positions: :math:`QK^\top` and :math:`AV` cost
    :math:`2 \cdot 2 n^2 d`. ``co``: ViLBERT's streams, a self-attention per
    stream plus the two cross-attentions: :math:`4d(T^2 + V^2 + 2TV)`,
    the same total split into four smaller products. ``cross``: only the two
    cross-attentions of a co-TRM, :math:`4d \cdot 2TV`. The projections
    (:math:`O(n d^2)`) are not counted: they are the same per position.
    """
    T, V, d = num_text, num_regions, hidden
    if kind == "single":
        return 4 * d * (T + V) ** 2
    if kind == "co":
        return 4 * d * (T * T + V * V + 2 * T * V)
    if kind == "cross":
        return 4 * d * 2 * T * V
    raise ValueError(f"kind must be 'single', 'co' or 'cross', got {kind!r}")


def attention_cost(
    lengths: list[tuple[int, int]],
    hidden: int = 256,
    heads: int = 4,
    batch: int = 32,
    repeats: int = 5,
    device: torch.device | str | None = None,
) -> list[dict[str, float]]:
    """Measured forward+backward time of the attention core, single-stream vs co-attention (chapter 7).

    For each ``(T, V)``: ``single`` runs one fused SDPA over ``T + V``
    positions; ``co`` runs the four SDPAs of a two-stream layer pair (text
    over text, regions over regions, text over regions, regions over text);
    ``cross`` only the last two (a co-TRM without the streams' own layers).
    Projections are left out on purpose, as in :func:`attention_flops`.
    Returns one row per length with the FLOP counts and, per kind, the
    median time (``<kind>_ms``) and the fastest round (``<kind>_min_ms``:
    as ``timeit`` advises, slower rounds mostly measure other processes, so
    on a shared machine the minimum is the better estimate of the work).
    """
    import torch.nn.functional as F

    dev = runtime.device(None if device is None else str(device))
    Dh = hidden // heads
    rows = []
    for T, V in lengths:
        g = torch.Generator(device="cpu").manual_seed(0)

        def make(n):
            return torch.randn(batch, heads, n, Dh, generator=g).to(dev).requires_grad_()

        joint = [make(T + V) for _ in range(3)]
        text = [make(T) for _ in range(3)]
        image = [make(V) for _ in range(3)]

        def single():
            F.scaled_dot_product_attention(*joint).sum().backward()

        def cross_pair():
            tq, tk, tv = text
            iq, ik, iv = image
            return (
                F.scaled_dot_product_attention(tq, ik, iv).sum()
                + F.scaled_dot_product_attention(iq, tk, tv).sum()
            )

        def co():
            (
                cross_pair()
                + F.scaled_dot_product_attention(*text).sum()
                + F.scaled_dot_product_attention(*image).sum()
            ).backward()

        def cross():
            cross_pair().backward()

        samples = time_rounds(
            {"single": single, "co": co, "cross": cross},
            repeats=repeats,
            warmup=1,
            sync=lambda: runtime.synchronize(dev),
        )
        row: dict[str, float] = {"text": T, "regions": V}
        for kind in ("single", "co", "cross"):
            row[f"{kind}_ms"] = 1e3 * statistics.median(samples[kind])
            row[f"{kind}_min_ms"] = 1e3 * min(samples[kind])
            row[f"{kind}_flops"] = batch * attention_flops(T, V, hidden, kind)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _maybe_autocast(device: torch.device, bf16: bool) -> Iterator[None]:
    if bf16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def _race(
    contenders: dict[str, Contender],
    device: torch.device,
    repeats: int,
    warmup: int,
    bf16: bool = False,
    wrap: Callable[[Callable[[], None]], Callable[[], None]] | None = None,
) -> dict[str, list[float]]:
    def step(c: Contender) -> Callable[[], None]:
        def go() -> None:
            with _maybe_autocast(device, bf16):
                c.step()

        return wrap(go) if wrap is not None else go

    return time_rounds(
        {name: step(c) for name, c in contenders.items()},
        repeats=repeats,
        warmup=warmup,
        sync=lambda: runtime.synchronize(device),
    )


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, Any]:
    import transformers

    import fusionlib

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fusionlib": fusionlib.__version__,
        "python": platform.python_version(),
    }


def bench_models(
    size: MatchedSize | None = None,
    repeats: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    device: str | None = None,
    attention: bool = True,
    attention_seq_lens: tuple[int, ...] = (24, 64, 256),
    precision: bool = True,
    cuda_extras: bool = True,
    compile: bool | tuple[str, ...] = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the whole comparison and return it as a dict (what :func:`main` writes to JSON).

    Keys: ``size``, ``device``, ``versions``, ``threads``, ``models`` (per
    model: label, parameters, GFLOP per step, time quartiles, memory),
    ``ratios`` (``"<fusionlib>_vs_<peer>"``: the per-round time ratio
    peer / fusionlib, median and quartiles), ``attention`` (chapter 1's
    table), ``precision`` (fp32 vs bf16 autocast, every model, any device;
    ``ratios_bf16``) and, on CUDA, ``sdpa_backends`` and ``compile``
    (``compile``: True, False, or the names of the models to compile).
    """
    size = size or MatchedSize()
    dev = runtime.device(device)
    say = print if verbose else (lambda *a, **k: None)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        report: dict[str, Any] = {
            "size": size.to_dict(),
            "device": dev.type,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(),
            "versions": _versions(),
            "repeats": repeats,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        say(
            f"{dev.type} ({report['device_name']}), {report['threads']} threads | torch {torch.__version__}, "
            f"transformers {report['versions']['transformers']}"
        )
        say(
            f"size: hidden {size.hidden_size}, heads {size.num_heads}, ffn {size.ffn_size}, batch {size.batch_size}, "
            f"{size.text_len} tokens, {size.num_regions} regions, LXMERT layers {size.lxmert_layers}, "
            f"single-stream layers {size.single_stream_layers}, dropout {size.dropout}"
        )
        contenders = build_contenders(size, dev)
        models: dict[str, dict[str, Any]] = {}
        for name, c in contenders.items():
            flops = step_flops(c.step)
            if dev.type == "cuda":
                memory = {
                    "peak_bytes": _peak_cuda_bytes(c.step, dev),
                    "kind": "torch.cuda.max_memory_allocated",
                }
            else:
                memory = {
                    "peak_bytes": saved_activation_bytes(c.step, exclude=c.model),
                    "kind": "bytes saved for backward (saved_tensors_hooks)",
                }
            models[name] = {
                "label": c.label,
                "parameters": c.num_parameters(),
                "gflop_per_step": flops / 1e9,
                "memory_bytes": memory["peak_bytes"],
                "memory_kind": memory["kind"],
            }
        samples = _race(contenders, dev, repeats, warmup)
        for name, s in samples.items():
            models[name].update(_summary(s))
            models[name]["samples_per_s"] = size.batch_size / statistics.median(s)
            models[name]["gflop_per_s"] = models[name]["gflop_per_step"] / statistics.median(s)
        report["models"] = models
        report["ratios"] = {
            f"{ours}_vs_{peer}": ratio_summary(samples[peer], samples[ours]) for ours, peer in PAIRS
        }
        _print_models(models, report["ratios"], say)

        if precision:
            report.update(_precision(contenders, size, dev, repeats, warmup, say))
        if dev.type == "cuda" and cuda_extras:
            report.update(_cuda_extras(contenders, dev, repeats, warmup, compile, say))
        if attention:
            from fusionlib.bench.attention import bench_attention

            rows = bench_attention(
                seq_lens=attention_seq_lens,
                batch=8,
                width=size.hidden_size,
                heads=size.num_heads,
                mode="train",
                repeats=max(3, repeats // 2),
                dev=str(dev),
            )
            report["attention"] = rows
            say("\nattention (batch 8, forward+backward), median ms:")
            say(f"{'seq_len':>8} {'scratch':>9} {'fused':>9} {'torch':>9} {'fused/torch':>12}")
            for r in rows:
                say(
                    f"{r['seq_len']:>8} {r['scratch']:>9.2f} {r['fused']:>9.2f} {r['torch']:>9.2f} "
                    f"{r['fused_over_torch']:>12.2f}"
                )
        return report
    finally:
        torch.set_num_threads(old_threads)


def _print_models(
    models: dict[str, dict[str, Any]], ratios: dict[str, dict[str, float]], say: Callable
) -> None:
    say(
        f"\n{'model':<46} {'params':>10} {'GFLOP':>7} {'ms/step':>9} {'IQR ms':>15} {'memory MB':>10}"
    )
    for m in models.values():
        say(
            f"{m['label']:<46} {m['parameters']:>10,} {m['gflop_per_step']:>7.2f} {m['median_ms']:>9.1f} "
            f"{m['q25_ms']:>7.1f}-{m['q75_ms']:<7.1f} {m['memory_bytes'] / 2**20:>10.1f}"
        )
    say("\nspeed-up = peer time / fusionlib time, per round (median [quartiles]):")
    for key, r in ratios.items():
        ours, peer = key.split("_vs_")
        say(
            f"  {LABELS[ours]} vs {LABELS[peer]}: {r['median']:.2f}x [{r['q25']:.2f}-{r['q75']:.2f}] "
            f"over {r['rounds']} rounds"
        )


def _precision(
    contenders: dict[str, Contender],
    size: MatchedSize,
    dev: torch.device,
    repeats: int,
    warmup: int,
    say: Callable,
) -> dict[str, Any]:
    """fp32 vs bf16 autocast for every model (both sides under the same precision), interleaved.

    On CUDA, fp32 matrix products use TF32 only if the user enabled it; the
    fp32 row is PyTorch's default. ``bf16_fraction_of_peak``: FLOPs per step
    / time / the GPU's dense bf16 peak (:func:`peak_bf16_flops`; None on CPU).
    """
    both = {}
    for name, c in contenders.items():
        both[name] = c.step

        def bf16_step(c=c):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                c.step()

        both[name + "@bf16"] = bf16_step
    samples = time_rounds(
        both, repeats=repeats, warmup=warmup, sync=lambda: runtime.synchronize(dev)
    )
    peak = peak_bf16_flops(dev)
    table = {}
    for name, c in contenders.items():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            flops = step_flops(c.step)
        seconds = statistics.median(samples[name + "@bf16"])
        table[name] = {
            "fp32_ms": 1e3 * statistics.median(samples[name]),
            "bf16_ms": 1e3 * seconds,
            "bf16_speedup": ratio_summary(samples[name], samples[name + "@bf16"])["median"],
            "bf16_samples_per_s": size.batch_size / seconds,
            "bf16_fraction_of_peak": (flops / seconds / peak) if peak else None,
        }
    ratios = {
        f"{ours}_vs_{peer}": ratio_summary(samples[peer + "@bf16"], samples[ours + "@bf16"])
        for ours, peer in PAIRS
    }
    say(
        f"\nfp32 vs bf16 autocast on {dev.type} (median ms per step; bf16 samples/s; fraction of the bf16 peak):"
    )
    for name, p in table.items():
        frac = (
            f"{100 * p['bf16_fraction_of_peak']:.1f}%"
            if p["bf16_fraction_of_peak"] is not None
            else "n/a"
        )
        say(
            f"  {LABELS[name]:<46} {p['fp32_ms']:>9.1f} {p['bf16_ms']:>9.1f} ({p['bf16_speedup']:.2f}x) "
            f"{p['bf16_samples_per_s']:>9.0f} {frac:>7}"
        )
    for key, r in ratios.items():
        ours, peer = key.split("_vs_")
        say(
            f"  bf16 speed-up {LABELS[ours]} vs {LABELS[peer]}: {r['median']:.2f}x [{r['q25']:.2f}-{r['q75']:.2f}]"
        )
    return {"precision": table, "ratios_bf16": ratios, "peak_bf16_flops": peak}


def sdpa_refusals(caught: list[warnings.WarningMessage]) -> list[str]:
    """Why SDPA refused a backend: the distinct warning texts, without torch's source locations."""
    reasons = []
    for w in caught:
        text = str(w.message).split(" (Triggered internally at")[0].strip()
        if text and text not in reasons:
            reasons.append(text)
    return reasons


def _cuda_extras(
    contenders: dict[str, Contender],
    dev: torch.device,
    repeats: int,
    warmup: int,
    compile: bool | tuple[str, ...],
    say: Callable,
) -> dict[str, Any]:
    """SDPA backends and torch.compile (fusionlib's models, bf16 autocast)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, Any] = {}

    # SDPA backends, fusionlib's models only (the peers never call SDPA), bf16.
    ours = {n: c for n, c in contenders.items() if n in ("vilbert", "uniter")}
    backends = {}
    for label, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("math", SDPBackend.MATH),
    ):

        def wrap(fn, backend=backend):
            def go():
                with sdpa_kernel([backend]):
                    fn()

            return go

        row = {}
        for name, c in ours.items():
            # A backend that cannot run warns once per reason before it raises; the reasons go into the
            # record with the error instead of onto the page (with this machine's paths in them).
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    samples = _race({name: c}, dev, repeats, warmup, bf16=True, wrap=wrap)
                    row[name] = {"ms": 1e3 * statistics.median(samples[name])}
                except RuntimeError as error:  # e.g. flash attention takes no arbitrary mask
                    row[name] = {
                        "ms": None,
                        "error": str(error).splitlines()[0][:200],
                        "reasons": sdpa_refusals(caught),
                    }
            if row[name]["ms"] is not None:  # it ran: whatever it warned is news, so pass it on
                for w in caught:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        backends[label] = row
    out["sdpa_backends"] = backends
    say("\nSDPA backends (bf16, median ms):")
    for label, row in backends.items():
        cells = ", ".join(
            f"{n} {v['ms']:.2f}" if v["ms"] is not None else f"{n} unsupported ({v['error'][:60]})"
            for n, v in row.items()
        )
        say(f"  {label:<10} {cells}")

    to_compile = tuple(ours) if compile is True else tuple(compile or ())
    if to_compile:
        compiled, failed = {}, {}
        for name, c in ours.items():
            if name not in to_compile:
                continue
            started = time.perf_counter()
            fast = Contender(name, c.model, torch.compile(c.forward))
            try:
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    fast.step()
                    fast.step()
            except Exception as error:  # noqa: BLE001 - inductor needs triton and a C compiler
                # A machine that cannot compile gets a note in the report, not a failed benchmark
                # (the measurements above are already taken). ``compile`` keeps only complete rows.
                failed[name] = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                torch._dynamo.reset()
                continue
            runtime.synchronize(dev)
            compile_s = time.perf_counter() - started
            samples = _race({name: c, name + "_compiled": fast}, dev, repeats, warmup, bf16=True)
            compiled[name] = {
                "eager_ms": 1e3 * statistics.median(samples[name]),
                "compiled_ms": 1e3 * statistics.median(samples[name + "_compiled"]),
                "compile_seconds": compile_s,
            }
        out["compile"] = compiled
        if failed:
            out["compile_errors"] = failed
            say("\ntorch.compile failed: " + ", ".join(f"{n}: {e}" for n, e in failed.items()))
        say(
            "\ntorch.compile (bf16, median ms): "
            + ", ".join(
                f"{n} eager {v['eager_ms']:.2f} -> compiled {v['compiled_ms']:.2f} (compiling took {v['compile_seconds']:.0f} s)"
                for n, v in compiled.items()
            )
        )
    return out


def results_name(device: torch.device | str) -> str:
    """``bench_models_<device type>``: the results file :func:`main` writes (``results/<name>.json``)."""
    return f"bench_models_{torch.device(device).type}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m fusionlib.bench models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = MatchedSize()
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (the target: 2)"
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed rounds (each times every model once)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--hidden", type=int, default=d.hidden_size)
    parser.add_argument("--heads", type=int, default=d.num_heads)
    parser.add_argument("--ffn", type=int, default=d.ffn_size)
    parser.add_argument("--batch", type=int, default=d.batch_size)
    parser.add_argument("--tokens", type=int, default=d.text_len)
    parser.add_argument("--regions", type=int, default=d.num_regions)
    parser.add_argument("--no-attention", action="store_true", help="skip the attention comparison")
    parser.add_argument("--no-precision", action="store_true", help="skip fp32 vs bf16 autocast")
    parser.add_argument("--no-compile", action="store_true", help="CUDA: skip torch.compile")
    parser.add_argument(
        "--out", default=None, help="JSON path (default: results/bench_models_<device>.json)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads <= 0:
        parser.error(f"--threads must be positive, got {args.threads}")
    size = MatchedSize(
        hidden_size=args.hidden,
        num_heads=args.heads,
        ffn_size=args.ffn,
        batch_size=args.batch,
        text_len=args.tokens,
        num_regions=args.regions,
    )
    report = bench_models(
        size,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        attention=not args.no_attention,
        precision=not args.no_precision,
        compile=not args.no_compile,
    )
    path = write_report(report, results_name(report["device"]), args.out)
    print(f"\nwrote {path}")
    return report
