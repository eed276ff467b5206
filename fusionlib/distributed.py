"""Training on several processes: DistributedDataParallel, sharded batches, a contrastive loss across ranks (chapter 7).

Pretraining on a real corpus outgrows one GPU. The recipe here is the
standard one, data parallelism: every process (a *rank*, one per GPU) holds
a full copy of the model, reads its own slice of each batch, and
:class:`torch.nn.parallel.DistributedDataParallel` averages the gradients
across ranks during the backward pass, so every copy takes the same step.

``torchrun`` starts the processes and tells each one who it is through
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); :func:`init_distributed` reads them::

    torchrun --nproc_per_node 8 train.py                   # one machine, 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 \\
             --rdzv_backend c10d --rdzv_endpoint host0:29500 train.py   # on each of 2 machines

:func:`fusionlib.train.train` notices an initialised process group and wraps
the model in DDP itself; the caller only shards the data
(:func:`sharded_loader`) and, for a contrastive loss, gathers the embeddings
(:func:`contrastive_loss_across_ranks`).

Three things make a distributed run equal to a one-process run with the same
global batch (tested: ``tests/test_distributed.py``):

1. **The same global batches.** :class:`ShardedBatchSampler` shuffles the
   dataset identically on every rank (the permutation depends on the seed and
   the epoch only) and gives rank ``r`` the ``r``-th slice of each global
   batch. Concatenated in rank order, the slices are the global batch.
2. **Gradients of the global loss.** DDP averages gradients over ranks, so
   each rank's loss must be its share of a *mean*: for a loss that is a mean
   over samples, the mean of the ranks' local means is the global mean.
3. **Losses that look at the whole batch.** A contrastive loss scores each
   image against *every* caption of the batch: its negatives live on other
   ranks. :func:`all_gather_with_grad` collects every rank's embeddings and
   lets the gradient flow back to the rank that made them, as TorchMultimodal
   and CLIP's training code do.

Random streams are per rank (:func:`seed_for_rank`): rank 0 keeps the run's
seed, the others derive their own, so dropout and masking differ between the
slices of a batch as they would within one big batch.

A runnable check of all three, one process against two on the same global
batch, is :mod:`fusionlib.examples.ddp_demo`. This module imports nothing
above :mod:`fusionlib.losses`: the training loop imports it, not the reverse.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from fusionlib import losses

__all__ = [
    "DistributedInfo",
    "init_distributed",
    "destroy_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "seed_for_rank",
    "DistributedModel",
    "wrap_model",
    "ShardedBatchSampler",
    "sharded_loader",
    "all_gather_with_grad",
    "all_reduce_mean",
    "contrastive_loss_across_ranks",
]


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Who this process is: ``rank`` of ``world_size``, ``local_rank`` on its machine, and its device."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def init_distributed(backend: str | None = None) -> DistributedInfo:
    """Join the process group that ``torchrun`` set up; a no-op for a plain ``python`` run.

    Reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (``torchrun`` sets them;
    ``MASTER_ADDR`` / ``MASTER_PORT`` are read by ``init_process_group``).
    With ``WORLD_SIZE`` unset or 1 nothing is initialised and the single
    process is rank 0 of 1. ``backend`` defaults to ``nccl`` with CUDA and
    ``gloo`` on CPU. With CUDA each process takes GPU ``LOCAL_RANK``
    (``torch.cuda.set_device``), so ``"cuda"`` means that GPU from then on.
    Calling it again returns the existing group's info.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistributedInfo(
            dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), device
        )
    if world_size == 1:
        return DistributedInfo(0, 1, local_rank, None, device)
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' (GPUs) or 'gloo' (CPU), got {backend!r}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(
                f"WORLD_SIZE={world_size} but {name} is not set: launch with torchrun, which sets it"
            )
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, device_id=device if backend == "nccl" else None
    )
    return DistributedInfo(rank, world_size, local_rank, backend, device)


def destroy_distributed() -> None:
    """Leave the process group (at the end of a script), if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints, logs and writes checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def seed_for_rank(seed: int, rank: int | None = None) -> int:
    """The seed of ``rank``'s random streams: ``seed`` itself on rank 0, a derived one elsewhere.

    Rank 0 keeps the single-process seed, so a one-process run and rank 0 of
    a distributed run draw the same numbers; the other ranks get independent
    streams (``numpy.random.SeedSequence``), never ``seed + rank`` (two runs
    with seeds 0 and 1 would then share streams).
    """
    rank = get_rank() if rank is None else rank
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if rank == 0:
        return seed
    return int(
        np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    )


# ---------------------------------------------------------------------------
# Data: every rank reads its slice of the same global batches
# ---------------------------------------------------------------------------


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``r``'s slice of each global batch: indices ``[r*b, (r+1)*b)`` of it, ``b = global / world``.

    The permutation of epoch ``e`` is drawn from a generator seeded with
    ``(seed, e)`` and is the same on every rank, so the slices of all ranks,
    concatenated in rank order, are exactly the global batch a single process
    with ``world_size=1`` reads. A last incomplete global batch is dropped
    (every rank must take as many steps with batches of one size: a
    collective with a missing rank waits forever). :func:`fusionlib.train.train`
    calls :meth:`set_epoch` at every new epoch.
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ):
        rank = get_rank() if rank is None else rank
        world_size = get_world_size() if world_size is None else world_size
        for name, value in (
            ("dataset_size", dataset_size),
            ("global_batch_size", global_batch_size),
            ("world_size", world_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be divisible by world_size={world_size} "
                "(every rank gets the same number of samples)"
            )
        if global_batch_size > dataset_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} exceeds the dataset's {dataset_size} samples"
            )
        self.dataset_size, self.global_batch_size = dataset_size, global_batch_size
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.dataset_size // self.global_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
            )
            order = torch.randperm(self.dataset_size, generator=g)
        else:
            order = torch.arange(self.dataset_size)
        b = self.local_batch_size
        for start in range(0, len(self) * self.global_batch_size, self.global_batch_size):
            lo = start + self.rank * b
            yield order[lo : lo + b].tolist()


def sharded_loader(
    dataset: Dataset,
    global_batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` over this rank's slices of the global batches (:class:`ShardedBatchSampler`).

    ``loader_kwargs`` go to ``DataLoader`` (``collate_fn``, ``num_workers``...;
    not ``batch_size``, ``shuffle`` or ``sampler``, which the batch sampler
    decides). In a single process it reads whole global batches.
    """
    for key in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
        if key in loader_kwargs:
            raise ValueError(
                f"sharded_loader decides {key!r} itself; pass global_batch_size and shuffle"
            )
    sampler = ShardedBatchSampler(len(dataset), global_batch_size, rank, world_size, shuffle, seed)
    return DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class DistributedModel(DistributedDataParallel):
    """``DistributedDataParallel`` that also answers the wrapped model's attributes.

    Step functions read things like ``model.config`` or ``model.vilbert``;
    plain DDP keeps the model in ``.module`` and would raise
    ``AttributeError``. Anything DDP does not have itself is looked up on the
    wrapped model, so a step function written for one process runs
    unchanged. Calls must still go through ``model(...)`` (DDP's forward),
    which prepares the gradient averaging.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_model(
    model: torch.nn.Module, device: torch.device | str, find_unused_parameters: bool = False
) -> DistributedModel:
    """``model`` (already on ``device``) in a :class:`DistributedModel` (:func:`fusionlib.train.train` calls it).

    DDP's constructor copies rank 0's weights to every rank, so all copies
    start equal whatever each rank initialised. ``find_unused_parameters``:
    set it when a step may leave parameters without a gradient (UNITER's
    task sampling trains one head per step); it costs a walk over the graph.
    """
    device = torch.device(device)
    gpus = None
    if device.type == "cuda":
        gpus = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedModel(model, device_ids=gpus, find_unused_parameters=find_unused_parameters)


# ---------------------------------------------------------------------------
# Collectives with gradients
# ---------------------------------------------------------------------------


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: every rank's ``(b, ...)`` tensor, concatenated in rank order: ``(world * b, ...)``.

    Backward: every rank computed a loss from the *whole* gathered tensor, so
    the gradient of rank ``r``'s slice is the sum over ranks of their
    gradients for it: an all-reduce (sum), then this rank's slice.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.local = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.local : (ctx.rank + 1) * ctx.local]


def _check_same_shape_on_all_ranks(name: str, x: Tensor) -> None:
    shape = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(
            f"{name} must have the same shape on every rank to be gathered, got "
            f"{[tuple(s.tolist()) for s in shapes]}; use sharded_loader (equal local batches)"
        )


def all_gather_with_grad(x: Tensor) -> Tensor:
    """``(b, ...)`` on each rank -> ``(world_size * b, ...)``, rank 0's rows first, differentiable.

    The gradient of the result flows back to the rank that made each row
    (summed over the ranks that used it). In a single process: ``x`` itself.
    Every rank must pass the same shape (checked).
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of shape (batch, ...), got {type(x).__name__}")
    if not is_distributed():
        return x
    _check_same_shape_on_all_ranks("x", x)
    return _AllGatherWithGrad.apply(x)


def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean over ranks of ``x`` (no gradient; for logging). ``x`` itself in a single process."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return x / dist.get_world_size()


def contrastive_loss_across_ranks(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    group_ids: Tensor | None = None,
    max_logit_scale: float = losses.MAX_LOGIT_SCALE,
) -> Tensor:
    r"""Symmetric InfoNCE over the *global* batch, each rank scoring its own rows (chapters 4, 7).

    In one process this is :func:`fusionlib.losses.contrastive_loss`. With
    ``W`` ranks of ``b`` pairs each, rank ``r`` gathers every rank's
    (normalised) embeddings with :func:`all_gather_with_grad` and computes
    the rows of the global ``(Wb, Wb)`` logit matrix that belong to its own
    images (image -> every caption) and its own captions (caption -> every
    image); the positive of local row ``i`` is global column ``r b + i``.
    That is the global loss's share of this rank: the mean over ranks (what
    DDP's gradient averaging takes) is exactly the one-process loss over the
    ``Wb`` pairs, and so are the gradients. Each rank stores a ``(b, Wb)``
    block, not the whole matrix (CLIP's "local loss").

    ``group_ids (b,)``: as in :func:`~fusionlib.losses.contrastive_loss`,
    pairs of different samples with the same id are not negatives; ids are
    gathered too, so duplicates on different ranks are caught.
    """
    if not is_distributed():
        return losses.contrastive_loss(image_emb, text_emb, logit_scale, group_ids, max_logit_scale)
    image_emb, text_emb, scale = losses.contrastive_inputs(
        image_emb, text_emb, logit_scale, max_logit_scale
    )
    all_images = all_gather_with_grad(image_emb)  # (W b, d)
    all_texts = all_gather_with_grad(text_emb)
    b = image_emb.shape[0]
    target = get_rank() * b + torch.arange(
        b, device=image_emb.device
    )  # global column of each positive
    image_logits = scale * image_emb @ all_texts.t()  # (b, W b): my images x every caption
    text_logits = scale * text_emb @ all_images.t()  # (b, W b): my captions x every image
    if group_ids is not None:
        group_ids = losses.check_group_ids(group_ids, b, image_emb.device)
        parts = [torch.empty_like(group_ids) for _ in range(get_world_size())]
        dist.all_gather(parts, group_ids.contiguous())
        all_groups = torch.cat(parts)
        false_negative = group_ids[:, None] == all_groups[None, :]
        false_negative[torch.arange(b, device=target.device), target] = False
        image_logits = image_logits.masked_fill(false_negative, -math.inf)
        text_logits = text_logits.masked_fill(false_negative, -math.inf)
    return (F.cross_entropy(image_logits, target) + F.cross_entropy(text_logits, target)) / 2
