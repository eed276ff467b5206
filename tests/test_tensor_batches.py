"""fusionlib.data.datasets.TensorBatches: the same batches as collate, from device-resident tensors (chapter 3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionlib.data.datasets import (
    CAPTION_KEYS,
    QUESTION_KEYS,
    TRUTH_KEYS,
    CaptionDataset,
    QuestionDataset,
    TensorBatches,
    collate,
    make_loader,
    make_tensor_loader,
    standardise_batch,
)
from fusionlib.data.shapes import WorldConfig, answer_vocab, generate_split
from fusionlib.data.tokenizer import train_tokenizer
from fusionlib.train import TrainConfig, train
from fusionlib.vision import DetectorConfig, extract_region_features, train_detector

WORLD = WorldConfig(num_train=10, num_val=2, num_test=2, num_questions=6)
DET = DetectorConfig(steps=1, batch_size=4)


@pytest.fixture(scope="module")
def data():
    scenes = generate_split(WORLD, "train")
    detector, _ = train_detector(WORLD, DET, scenes, progress=False)
    features = extract_region_features(
        detector, scenes, max_regions=6 + DET.num_jitter + DET.num_background
    )
    tok = train_tokenizer(
        [c for s in scenes for c in s.captions] + [q.text for s in scenes for q in s.questions]
    )
    return {
        "questions": QuestionDataset(scenes, features, tok, answer_vocab(WORLD)),
        "captions": CaptionDataset(scenes, features, tok),
    }


def assert_same_batch(a, b):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", ["questions", "captions"])
def test_batches_equal_collate_of_the_same_items(data, kind):
    ds = data[kind]
    tb = TensorBatches(ds)
    assert len(tb) == len(ds)
    for indices in ([0], [3, 1, 4, 1, 5], list(range(len(ds)))[::-1], [-1, 2]):
        want = collate([ds[i] for i in indices], pad_token_id=ds.pad_token_id)
        got = tb.__getitems__(indices)
        assert set(got) == set(
            QUESTION_KEYS if kind == "questions" else CAPTION_KEYS + TRUTH_KEYS
        ) | {"attention_mask"}
        assert_same_batch({k: want[k] for k in got}, got)
    # Short texts only: input_ids are trimmed to the batch's longest, as collate pads them.
    lengths = ds.lengths[ds.text_id]
    short = [int(i) for i in torch.nonzero(lengths == lengths.min()).flatten()[:3]]
    assert tb.__getitems__(short)["input_ids"].shape[1] == int(lengths.min())


@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_gives_the_batches_of_make_loader(data, shuffle):
    ds = data["questions"]
    ours = list(make_tensor_loader(TensorBatches(ds), batch_size=16, shuffle=shuffle, seed=3))
    theirs = list(make_loader(ds, batch_size=16, shuffle=shuffle, seed=3))
    assert len(ours) == len(theirs) == -(-len(ds) // 16)  # the last batch is smaller
    for a, b in zip(theirs, ours):
        assert_same_batch(a, b)


def test_keys_restrict_the_batch_and_are_checked(data):
    ds = data["questions"]
    tb = TensorBatches(
        ds, keys=("input_ids", "region_feats", "region_loc5", "region_mask", "answer")
    )
    batch = tb.__getitems__([0, 1])
    assert list(batch) == [
        "input_ids",
        "attention_mask",
        "region_feats",
        "region_loc5",
        "region_mask",
        "answer",
    ]
    only_regions = TensorBatches(ds, keys=("region_feats",)).__getitems__([2])
    assert list(only_regions) == ["region_feats"]
    assert tb[0]["answer"].shape == (1,)  # an item is a batch of one
    with pytest.raises(ValueError, match="caption_index"):
        TensorBatches(ds, keys=("caption_index",))
    with pytest.raises(TypeError, match="QuestionDataset or CaptionDataset"):
        TensorBatches([ds[0]])
    with pytest.raises(IndexError, match="must lie in"):
        tb.__getitems__([len(ds)])
    with pytest.raises(ValueError, match="at least one"):
        tb.__getitems__([])
    with pytest.raises(ValueError, match="batch_size"):
        make_tensor_loader(tb, batch_size=0)
    with pytest.raises(TypeError, match="TensorBatches"):
        make_tensor_loader(ds, batch_size=4)


class Probe(nn.Module):
    """A model whose loss depends on the batch and on dropout, so replays must match exactly."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, batch):
        return self.linear(self.dropout(batch["region_feats"].mean(1))).squeeze(-1)


def run(loader, steps, seen, checkpoint_dir=None, resume=False, crash_at=None):
    def step_fn(model, batch, task):
        step = len(seen) + 1
        if crash_at is not None and step == crash_at:
            raise KeyboardInterrupt
        seen.append((batch["image_index"] * 100 + batch["question_index"]).tolist())
        return {"loss": ((model(batch) - batch["answer"].float()) ** 2).mean()}

    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, lr=0.01, seed=5, save_every=3, checkpoint_dir=checkpoint_dir)
    return train(Probe(), loader, cfg, step_fn, device="cpu", progress=False, resume=resume)


def test_train_reshuffles_each_epoch_and_resumes_exactly(data, tmp_path):
    ds = data["questions"]
    steps = 3 * -(-len(ds) // 16)  # three epochs
    seen_plain, seen_tensor = [], []
    plain = run(make_loader(ds, batch_size=16, seed=0), steps, seen_plain)
    straight = run(make_tensor_loader(TensorBatches(ds), batch_size=16, seed=0), steps, seen_tensor)
    assert seen_tensor == seen_plain  # train() drives both the same way
    assert straight.train["loss"] == pytest.approx(plain.train["loss"], abs=1e-6)
    per_epoch = steps // 3
    epochs = [
        sorted(x for b in seen_tensor[e * per_epoch : (e + 1) * per_epoch] for x in b)
        for e in range(3)
    ]
    assert epochs[0] == epochs[1] == epochs[2] and len(epochs[0]) == len(ds)
    assert seen_tensor[:per_epoch] != seen_tensor[per_epoch : 2 * per_epoch]

    seen_crashed: list = []
    with pytest.raises(KeyboardInterrupt):
        run(
            make_tensor_loader(TensorBatches(ds), batch_size=16, seed=0),
            steps,
            seen_crashed,
            str(tmp_path),
            crash_at=per_epoch + 1,
        )
    saved = torch.load(
        tmp_path / "last" / "trainer_state.pt", map_location="cpu", weights_only=True
    )["step"]
    assert 0 < saved < per_epoch and saved % 3 == 0  # resumes in the middle of an epoch
    seen_resumed = list(seen_crashed[:saved])
    resumed = run(
        make_tensor_loader(TensorBatches(ds), batch_size=16, seed=0),
        steps,
        seen_resumed,
        str(tmp_path),
        resume=True,
    )
    assert seen_resumed == seen_tensor
    assert resumed.train["loss"] == pytest.approx(straight.train["loss"], abs=1e-6)


def test_standardise_uses_real_regions_and_keeps_padding_zero(data):
    ds = data["questions"]
    train_tb, other = TensorBatches(ds), TensorBatches(ds)
    # Make some padding, to check that it neither enters the statistics nor stops being zero.
    for tb in (train_tb, other):
        tb.per_image["region_mask"][:, -2:] = False
        for key in ("region_feats", "region_loc5", "region_loc7"):
            tb.per_image[key][:, -2:] = 0.0
    raw = {k: train_tb.per_image[k].clone() for k in ("region_feats", "region_loc5", "image_feats")}
    stats = train_tb.standardise()
    assert set(stats) == {"region_feats", "region_loc5", "region_loc7"}
    mask = train_tb.per_image["region_mask"]
    for key in stats:
        real = train_tb.per_image[key][mask]
        torch.testing.assert_close(real.mean(0), torch.zeros(real.shape[1]), atol=1e-4, rtol=0)
        std = real.std(0)  # 1, or 0 for a dimension that never varies
        assert torch.all(((std - 1).abs() < 1e-3) | (std < 1e-6)), (key, std)
        assert torch.all(train_tb.per_image[key][~mask] == 0)
    mean, std = stats["region_loc5"]
    want = (raw["region_loc5"] - mean) / std
    torch.testing.assert_close(train_tb.per_image["region_loc5"][mask], want[mask])
    mean, std = stats["region_feats"]
    torch.testing.assert_close(train_tb.per_image["image_feats"], (raw["image_feats"] - mean) / std)
    # Another split takes the training statistics as they are.
    assert other.standardise(stats).keys() == stats.keys()
    torch.testing.assert_close(other.per_image["region_loc5"], train_tb.per_image["region_loc5"])
    with pytest.raises(ValueError, match="no entry"):
        TensorBatches(ds).standardise({"region_feats": stats["region_feats"]})
    with pytest.raises(ValueError, match="keys must be among"):
        TensorBatches(ds).standardise(keys=("answer",))
    with pytest.raises(ValueError, match="region_mask"):
        TensorBatches(ds, keys=("region_feats",)).standardise()


def test_standardise_scale_is_carried_by_the_statistics(data):
    ds = data["questions"]
    train_tb, other = TensorBatches(ds), TensorBatches(ds)
    stats = train_tb.standardise(scale={"region_loc5": 3.0})
    real = train_tb.per_image["region_loc5"][train_tb.per_image["region_mask"]]
    varying = real.std(0) > 1e-3
    torch.testing.assert_close(
        real.std(0)[varying], torch.full((int(varying.sum()),), 3.0), atol=1e-3, rtol=0
    )
    other.standardise(stats)
    torch.testing.assert_close(other.per_image["region_loc5"], train_tb.per_image["region_loc5"])
    with pytest.raises(ValueError, match="positive numbers"):
        TensorBatches(ds).standardise(scale={"region_loc5": 0.0})
    with pytest.raises(ValueError, match="positive numbers"):
        TensorBatches(ds).standardise(scale={"answer": 2.0})
    with pytest.raises(ValueError, match="when measuring"):
        TensorBatches(ds).standardise(stats, scale={"region_loc5": 3.0})


def test_standardise_batch_gives_a_collated_batch_what_tensor_batches_give(data):
    """A batch built by collate and standardised on its own equals the standardised TensorBatches batch."""
    ds = data["captions"]
    tb = TensorBatches(ds)
    stats = tb.standardise()
    items = [0, 3, 5, len(ds) - 1]
    ours = standardise_batch(collate([ds[i] for i in items]), stats)
    theirs = tb.__getitems__(items)
    for key in (
        "region_feats",
        "region_loc5",
        "region_loc7",
        "image_feats",
        "input_ids",
        "region_mask",
    ):
        torch.testing.assert_close(ours[key], theirs[key], msg=key)
    padded = collate([ds[i] for i in items])
    padded["region_mask"] = padded["region_mask"].clone()
    padded["region_mask"][:, -1] = False
    assert torch.all(standardise_batch(padded, stats)["region_feats"][:, -1] == 0)
    with pytest.raises(ValueError, match="region_mask"):
        standardise_batch({"region_feats": theirs["region_feats"]}, stats)
    with pytest.raises(ValueError, match="must be among"):
        standardise_batch(theirs, {"answer": stats["region_feats"]})
    with pytest.raises(ValueError, match=r"statistics\['region_loc5'\]"):
        standardise_batch(theirs, {"region_loc5": stats["region_loc7"]})
