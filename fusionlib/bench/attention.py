"""``python -m fusionlib.bench attention``: from-scratch vs fused vs ``nn.MultiheadAttention``.

For each sequence length it times, interleaved, one forward (``--mode
forward``, under ``no_grad``) or forward+backward (``--mode train``) of

- ``scratch``: :class:`~fusionlib.attention.MultiHeadAttention` with
  ``need_weights=True``, which runs the from-scratch softmax(QKᵀ/√d)V;
- ``fused``: the same module with ``need_weights=False``, which calls
  ``F.scaled_dot_product_attention``;
- ``torch``: :class:`torch.nn.MultiheadAttention` (``batch_first=True``,
  ``need_weights=False``) with the same weights.

The ``fused/torch`` column is the ratio of medians (1.00 = as fast).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from fusionlib import runtime
from fusionlib.attention import MultiHeadAttention
from fusionlib.bench import time_interleaved


def bench_attention(
    seq_lens=(16, 64, 256, 1024),
    batch=8,
    width=256,
    heads=8,
    mode="train",
    repeats=20,
    dev: str | None = None,
) -> list[dict]:
    dev = runtime.device(dev)
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(width, heads, batch_first=True).to(dev)
    ours = MultiHeadAttention.from_torch(reference)
    rows = []
    for L in seq_lens:
        x = torch.randn(batch, L, width, device=dev, requires_grad=(mode == "train"))

        def step(fn):
            if mode == "train":

                def go():
                    fn().sum().backward()
            else:

                def go():
                    with torch.no_grad():
                        fn()

            return go

        times = time_interleaved(
            {
                "scratch": step(lambda: ours(x, need_weights=True)[0]),
                "fused": step(lambda: ours(x)[0]),
                "torch": step(lambda: reference(x, x, x, need_weights=False)[0]),
            },
            repeats=repeats,
            sync=lambda: runtime.synchronize(dev),
        )
        rows.append(
            {
                "seq_len": L,
                **{k: v * 1e3 for k, v in times.items()},
                "fused_over_torch": times["fused"] / times["torch"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fusionlib.bench attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mode", choices=("train", "forward"), default="train")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(runtime.summary())
    print(
        f"mode={args.mode} batch={args.batch} width={args.width} heads={args.heads}; median ms per step"
    )
    print(f"{'seq_len':>8} {'scratch':>10} {'fused':>10} {'torch':>10} {'fused/torch':>12}")
    for r in bench_attention(
        args.seq_lens, args.batch, args.width, args.heads, args.mode, args.repeats, args.device
    ):
        print(
            f"{r['seq_len']:>8} {r['scratch']:>10.2f} {r['fused']:>10.2f} {r['torch']:>10.2f} "
            f"{r['fused_over_torch']:>12.2f}"
        )
