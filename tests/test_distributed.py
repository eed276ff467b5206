"""fusionlib.distributed: sharded batches, gathers with gradient, and DDP training equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fusionlib import distributed, losses
from fusionlib.distributed import ShardedBatchSampler, sharded_loader

# Two gloo processes and one process on the same global batch must log the same losses and end with the
# same weights. Measured: both differ by < 1e-6 (float32 sums in another order); this is the stated bound.
DDP_TOLERANCE = 1e-5


def test_sharded_slices_concatenate_to_the_global_batch():
    n, global_batch, world = 50, 12, 3
    single = ShardedBatchSampler(n, global_batch, rank=0, world_size=1, seed=7)
    shards = [
        ShardedBatchSampler(n, global_batch, rank=r, world_size=world, seed=7) for r in range(world)
    ]
    for epoch in (0, 1):
        for s in [single, *shards]:
            s.set_epoch(epoch)
        expected = list(single)
        per_rank = [list(s) for s in shards]
        assert len(expected) == len(single) == n // global_batch == 4
        for k, batch in enumerate(expected):
            assert sum((per_rank[r][k] for r in range(world)), []) == batch
            assert all(len(per_rank[r][k]) == global_batch // world for r in range(world))
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert list(single) != first  # a new epoch is a new shuffle
    single.set_epoch(0)
    assert list(single) == first  # ... and the same one again for the same epoch


def test_sharded_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible by world_size"):
        ShardedBatchSampler(50, 10, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank must be in"):
        ShardedBatchSampler(50, 12, rank=3, world_size=3)
    with pytest.raises(ValueError, match="exceeds the dataset"):
        ShardedBatchSampler(5, 12, rank=0, world_size=1)
    with pytest.raises(ValueError, match="decides 'batch_size'"):
        sharded_loader(list(range(10)), 4, batch_size=2)


def test_single_process_helpers_are_identities():
    assert not distributed.is_distributed()
    assert (
        distributed.get_rank() == 0
        and distributed.get_world_size() == 1
        and distributed.is_main_process()
    )
    info = distributed.init_distributed("gloo")  # WORLD_SIZE unset: nothing to join
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    x = torch.randn(4, 3, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x
    assert torch.equal(distributed.all_reduce_mean(x), x)
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    groups = torch.tensor([0, 1, 1, 2, 3, 4])
    assert torch.equal(
        distributed.contrastive_loss_across_ranks(image, text, 2.0, groups),
        losses.contrastive_loss(image, text, 2.0, groups),
    )


def test_seed_for_rank():
    assert distributed.seed_for_rank(5, rank=0) == 5
    assert distributed.seed_for_rank(5, rank=1) == distributed.seed_for_rank(5, rank=1) != 5
    assert distributed.seed_for_rank(5, rank=1) != distributed.seed_for_rank(6, rank=0) + 1
    assert len({distributed.seed_for_rank(0, rank=r) for r in range(8)}) == 8
    with pytest.raises(ValueError, match="seed must be"):
        distributed.seed_for_rank(-1, rank=0)


def test_init_distributed_explains_a_missing_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        distributed.init_distributed("gloo")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        distributed.init_distributed("gloo")


def _run(args: list[str], out: str, tmp_path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for name in (
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "FUSIONLIB_PROFILE",
    ):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, *args, "--out", out],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) vs plain python: DDP + the contrastive loss across ranks.

    The demonstration model trains 6 steps on global batches of 16 pairs (8 per rank), with duplicates
    in the batches (group ids gathered across ranks) and AdamW at lr 1e-2, so any error in the sharding,
    the gathered negatives, their gradient or DDP's averaging changes the losses at once.
    """
    common = ["--steps", "6", "--global-batch", "16", "--lr", "1e-2"]
    one = _run(["-m", "fusionlib.examples.ddp_demo", *common], str(tmp_path / "one.json"), tmp_path)
    two = _run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "fusionlib.examples.ddp_demo",
            *common,
        ],
        str(tmp_path / "two.json"),
        tmp_path,
    )
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["local_batch"], two["local_batch"]) == (16, 8)
    loss_one, loss_two = torch.tensor(one["loss"]), torch.tensor(two["loss"])
    assert len(loss_one) == 6 and loss_one[-1] < loss_one[0]  # it learns
    torch.testing.assert_close(loss_two, loss_one, rtol=0, atol=DDP_TOLERANCE)
    for name, value in one["weights"].items():
        torch.testing.assert_close(
            torch.tensor(two["weights"][name]),
            torch.tensor(value),
            rtol=0,
            atol=DDP_TOLERANCE,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def test_the_wrapped_model_answers_the_models_attributes(tmp_path):
    """Step functions read ``model.config`` & co.; under DDP they get the wrapped model's."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.Linear(3, 2)
        model.config = {"width": 3}
        wrapped = distributed.wrap_model(model, "cpu")
        assert (
            wrapped.module is model
            and wrapped.config == {"width": 3}
            and wrapped.weight is model.weight
        )
        x = torch.randn(4, 3)
        torch.testing.assert_close(wrapped(x), model(x))
        with pytest.raises(AttributeError):
            wrapped.no_such_attribute
    finally:
        dist.destroy_process_group()
