"""One process against two: a small contrastive model trained with DDP on the same global batch (chapter 7).

Chapter 7, section 7.7 ("Scaling out") runs this module twice and compares
the losses and the final weights::

    python -m fusionlib.examples.ddp_demo                                        # one process
    torchrun --standalone --nproc_per_node 2 -m fusionlib.examples.ddp_demo      # two CPU processes (gloo)

With the same ``--global-batch`` both print the same losses; ``--out``
writes them and the final weights as JSON, which
``tests/test_distributed.py`` holds to ``1e-5``. The model is a dual encoder
trained with :func:`fusionlib.distributed.contrastive_loss_across_ranks`, so
the check covers the sharding, the gathered negatives and their gradient,
and DDP's averaging in :func:`fusionlib.train.train`. It lives here rather
than in :mod:`fusionlib.distributed` because it needs the training loop,
which itself imports :mod:`fusionlib.distributed`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fusionlib import losses, runtime
from fusionlib.distributed import (
    contrastive_loss_across_ranks,
    destroy_distributed,
    init_distributed,
    sharded_loader,
)
from fusionlib.fileio import atomic_write_json
from fusionlib.train import TrainConfig, train


class PairedClusters(Dataset):
    """Synthetic image-caption pairs: a pair's image feature and its words both come from one of
    ``num_clusters`` latent classes; ``image_index`` is the class (pairs of one class are duplicates)."""

    def __init__(
        self,
        size: int = 512,
        num_clusters: int = 64,
        feature_dim: int = 32,
        vocab_size: int = 128,
        words: int = 6,
        seed: int = 0,
    ):
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(num_clusters, feature_dim, generator=g)
        word_table = torch.randint(1, vocab_size, (num_clusters, 3 * words), generator=g)
        self.cluster = torch.randint(0, num_clusters, (size,), generator=g)
        self.image_feats = centres[self.cluster] + 0.5 * torch.randn(size, feature_dim, generator=g)
        pick = torch.randint(0, 3 * words, (size, words), generator=g)
        self.input_ids = torch.gather(word_table[self.cluster], 1, pick)
        self.vocab_size, self.feature_dim = vocab_size, feature_dim

    def __len__(self) -> int:
        return len(self.cluster)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "image_feats": self.image_feats[i],
            "input_ids": self.input_ids[i],
            "image_index": self.cluster[i],
        }


class DualEncoder(torch.nn.Module):
    """Two small encoders and a learnable temperature: the contrastive model of the demonstration."""

    def __init__(self, feature_dim: int, vocab_size: int, width: int = 64, embed_dim: int = 32):
        super().__init__()
        self.image = torch.nn.Sequential(
            torch.nn.Linear(feature_dim, width), torch.nn.GELU(), torch.nn.Linear(width, embed_dim)
        )
        self.words = torch.nn.Embedding(vocab_size, width)
        self.text = torch.nn.Sequential(torch.nn.GELU(), torch.nn.Linear(width, embed_dim))
        self.loss = losses.ContrastiveLoss()

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.image(batch["image_feats"]), self.text(
            self.words(batch["input_ids"]).mean(dim=1)
        )


def contrastive_step(
    model: torch.nn.Module, batch: dict[str, Tensor], task: str
) -> dict[str, Tensor]:
    image_emb, text_emb = model(batch)
    # Under DDP `model` is a DistributedModel: `model.loss` is the wrapped model's.
    loss = contrastive_loss_across_ranks(
        image_emb, text_emb, model.loss.logit_scale, batch["image_index"]
    )
    return {"loss": loss}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train a small dual encoder with the contrastive loss across ranks; print (and save) its losses."""
    parser = argparse.ArgumentParser(
        prog="python -m fusionlib.examples.ddp_demo", description=main.__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out", default=None, help="rank 0 writes the losses and final weights here (JSON)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = init_distributed("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        data = PairedClusters()
        torch.manual_seed(0)  # the same initial weights on every rank
        model = DualEncoder(data.feature_dim, data.vocab_size)
        loader = sharded_loader(data, args.global_batch, seed=0)
        config = TrainConfig(
            steps=args.steps, lr=args.lr, warmup_steps=0, schedule="constant", grad_clip=None
        )
        started = time.perf_counter()
        history = train(
            model,
            loader,
            config,
            contrastive_step,
            device=info.device if args.device != "cpu" else "cpu",
            progress=False,
        )
        seconds = time.perf_counter() - started
        result = {
            "world_size": info.world_size,
            "global_batch": args.global_batch,
            "local_batch": args.global_batch // info.world_size,
            "loss": history.train["loss"],
            "seconds": seconds,
            "weights": {
                k: v.detach().cpu().flatten().tolist() for k, v in model.state_dict().items()
            },
        }
        if info.is_main:
            losses_text = " ".join(
                f"{v:.4f}" for v in history.train["loss"][:: max(1, args.steps // 10)]
            )
            print(
                f"{info.world_size} process(es) x {result['local_batch']} pairs = global batch {args.global_batch}: "
                f"{args.steps} steps in {runtime.format_seconds(seconds)}; loss {losses_text} ... "
                f"{history.train['loss'][-1]:.4f}"
            )
            if args.out:
                atomic_write_json(args.out, result, indent=None)
        return result
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
