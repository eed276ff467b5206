"""fusionlib.train: schedule, exact resume, task sampling, the NaN stop, checkpoints (chapters 3-7)."""

import datetime
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusionlib.models import QuestionOnly, VQAConfig, load_pretrained
from fusionlib.train import (
    DEFAULT_TASK,
    History,
    TrainConfig,
    load_weights,
    lr_multiplier,
    lr_schedule,
    to_device,
    train,
)


class Items(Dataset):
    """Item i is (x_i, y_i, i): a small regression problem that remembers which item it is."""

    def __init__(self, n=24, dim=4, seed=0, tag=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g)
        self.tag = tag

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {
            "x": self.x[i],
            "y": self.y[i],
            "index": torch.tensor(i),
            "tag": torch.tensor(self.tag),
        }


def noisy_collate(items):
    """A collate that draws from the global RNG (as on-the-fly masking does) to test that resuming keeps it in step."""
    batch = torch.utils.data.default_collate(items)
    batch["x"] = batch["x"] + 0.01 * torch.randn(batch["x"].shape)
    return batch


class DropoutNet(nn.Module):
    def __init__(self, dim=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def mse_step(model, batch, task):
    pred = model(batch["x"])
    return {"loss": F.mse_loss(pred, batch["y"]), "batch_mean": batch["x"].mean()}


def loaders(shuffle=True):
    return {
        "a": DataLoader(
            Items(24, seed=0, tag=0), batch_size=8, shuffle=shuffle, collate_fn=noisy_collate
        ),
        "b": DataLoader(
            Items(15, seed=1, tag=1), batch_size=4, shuffle=shuffle, collate_fn=noisy_collate
        ),
    }


# ---------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------


def test_lr_schedule_hand_computed():
    cfg = TrainConfig(steps=10, lr=2.0, warmup_steps=2, schedule="cosine")
    expected = [1.0, 2.0] + [1.0 + math.cos(math.pi * k / 8) for k in range(8)]
    assert lr_schedule(cfg) == pytest.approx(expected)
    assert lr_schedule(cfg)[3] == pytest.approx(1.0 + math.cos(math.pi / 8))  # 1.9239
    lin = TrainConfig(steps=10, lr=1.0, warmup_steps=2, schedule="linear", min_lr_ratio=0.2)
    assert lr_schedule(lin) == pytest.approx(
        [0.5, 1.0] + [0.2 + 0.8 * (1 - k / 8) for k in range(8)]
    )
    const = TrainConfig(steps=5, lr=0.1, warmup_steps=4, schedule="constant")
    assert lr_schedule(const) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    assert lr_multiplier(0, TrainConfig(steps=3)) == 1.0  # no warm-up, cosine starts at lr


def test_the_loop_uses_the_schedule():
    cfg = TrainConfig(steps=12, lr=0.01, warmup_steps=3, schedule="cosine", seed=0)
    history = train(DropoutNet(), loaders()["a"], cfg, mse_step, device="cpu", progress=False)
    assert history.train["lr"] == pytest.approx(lr_schedule(cfg))
    assert history.train["step"] == list(range(1, 13)) and set(history.train["task"]) == {
        DEFAULT_TASK
    }
    assert len(history.train["batch_mean"]) == 12 and history.seconds > 0


# ---------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------


class Crash(Exception):
    pass


def crashing_at(step_to_crash):
    calls = {"n": 0}

    def step_fn(model, batch, task):
        calls["n"] += 1
        if calls["n"] == step_to_crash:
            raise Crash
        return mse_step(model, batch, task)

    return step_fn


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    def run(seed_model, step_fn, checkpoint_dir, resume=False):
        torch.manual_seed(seed_model)
        model = DropoutNet()
        cfg = TrainConfig(
            steps=20, lr=0.01, warmup_steps=3, save_every=5, seed=7, checkpoint_dir=checkpoint_dir
        )
        return model, train(
            model,
            loaders(),
            cfg,
            step_fn,
            task_mix={"a": 2, "b": 1},
            device="cpu",
            progress=False,
            resume=resume,
        )

    model_straight, straight = run(0, mse_step, str(tmp_path / "straight"))
    with pytest.raises(Crash):
        run(0, crashing_at(11), str(tmp_path / "crashed"))  # dies during step 11
    state = torch.load(
        tmp_path / "crashed" / "last" / "trainer_state.pt", map_location="cpu", weights_only=True
    )
    assert state["step"] == 10
    # A different initialisation: everything must come from the checkpoint.
    model_resumed, resumed = run(123, mse_step, str(tmp_path / "crashed"), resume=True)

    assert resumed.train["step"] == list(range(1, 21))
    assert resumed.train["task"] == straight.train["task"]
    assert resumed.train["loss"] == pytest.approx(straight.train["loss"], abs=1e-6, rel=0)
    assert resumed.train["batch_mean"] == pytest.approx(
        straight.train["batch_mean"], abs=1e-6, rel=0
    )
    for p, q in zip(model_resumed.parameters(), model_straight.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)

    # Resuming a finished run does nothing and returns its history.
    _, again = run(5, crashing_at(1), str(tmp_path / "crashed"), resume=True)
    assert again.train["loss"] == resumed.train["loss"]


def test_resume_recovers_from_a_crash_in_the_middle_of_a_checkpoint_swap(tmp_path):
    """fileio.replace_dir moves last/ aside to last.old/ before the new last/ goes in: a crash between the
    two moves leaves last.old/ (complete) and a half-written last.tmp/, and resuming must use last.old/."""

    def run(step_fn, checkpoint_dir, resume=False, seed_model=0):
        torch.manual_seed(seed_model)
        cfg = TrainConfig(
            steps=8, lr=0.01, save_every=4, seed=3, checkpoint_dir=str(checkpoint_dir)
        )
        return train(
            DropoutNet(), loaders()["a"], cfg, step_fn, device="cpu", progress=False, resume=resume
        )

    straight = run(mse_step, tmp_path / "straight")
    with pytest.raises(Crash):
        run(crashing_at(6), tmp_path / "crashed")  # last/ holds step 4
    os.replace(tmp_path / "crashed" / "last", tmp_path / "crashed" / "last.old")
    os.makedirs(tmp_path / "crashed" / "last.tmp")
    (tmp_path / "crashed" / "last.tmp" / "model.safetensors").write_bytes(b"half a file")

    resumed = run(
        mse_step, tmp_path / "crashed", resume=True, seed_model=123
    )  # weights from the checkpoint only
    assert resumed.train["loss"] == pytest.approx(straight.train["loss"], abs=1e-6, rel=0)
    assert sorted(os.listdir(tmp_path / "crashed")) == ["last"]  # the next swap cleaned up


def test_resume_without_checkpoint_starts_fresh_and_needs_a_dir(tmp_path):
    cfg = TrainConfig(steps=3, checkpoint_dir=str(tmp_path / "none-yet"))
    history = train(
        DropoutNet(), loaders()["a"], cfg, mse_step, device="cpu", progress=False, resume=True
    )
    assert history.train["step"] == [1, 2, 3]
    assert os.path.isfile(tmp_path / "none-yet" / "last" / "model.safetensors")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(
            DropoutNet(),
            loaders()["a"],
            TrainConfig(steps=3),
            mse_step,
            device="cpu",
            progress=False,
            resume=True,
        )


def test_each_epoch_is_a_new_seeded_shuffle():
    def order(seed):
        seen = []

        def step_fn(model, batch, task):
            seen.extend(batch["index"].tolist())
            return mse_step(model, batch, task)

        train(
            DropoutNet(),
            loaders()["a"],
            TrainConfig(steps=9, seed=seed),
            step_fn,
            device="cpu",
            progress=False,
        )
        return [seen[i * 24 : (i + 1) * 24] for i in range(3)]  # 3 epochs of 3 batches

    epochs = order(seed=0)
    assert all(sorted(e) == list(range(24)) for e in epochs)  # every item once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    assert order(seed=0) == epochs and order(seed=1) != epochs


# ---------------------------------------------------------------------------
# Task sampling
# ---------------------------------------------------------------------------


def test_task_sampling_follows_the_mix():
    data = {
        "itm": DataLoader(Items(8, tag=0), batch_size=8),
        "mlm": DataLoader(Items(8, tag=1), batch_size=8),
        "mrfr": DataLoader(Items(8, tag=2), batch_size=8),
        "never": DataLoader(Items(8, tag=3), batch_size=8),
    }
    tags = {"itm": 0, "mlm": 1, "mrfr": 2, "never": 3}

    def step_fn(model, batch, task):
        assert int(batch["tag"][0]) == tags[task]  # the batch came from that task's loader
        return {"loss": model(batch["x"]).pow(2).mean()}

    def run(seed):
        cfg = TrainConfig(steps=1500, seed=seed, lr=1e-4)
        h = train(
            nn.Linear(4, 1),
            data,
            cfg,
            step_fn,
            task_mix={"itm": 2, "mlm": 2, "mrfr": 1, "never": 0},
            device="cpu",
            progress=False,
        )
        return h

    h = run(0)
    tasks = h.train["task"]
    freq = {t: tasks.count(t) / len(tasks) for t in data}
    assert freq["itm"] == pytest.approx(0.4, abs=0.04) and freq["mlm"] == pytest.approx(
        0.4, abs=0.04
    )
    assert freq["mrfr"] == pytest.approx(0.2, abs=0.03) and freq["never"] == 0
    assert run(0).train["task"] == tasks and run(1).train["task"] != tasks
    per_task = h.task_losses()
    assert sum(len(steps) for steps, _ in per_task.values()) == 1500 and "never" not in per_task


def test_task_mix_must_match_the_tasks():
    with pytest.raises(ValueError, match="task_mix"):
        train(
            DropoutNet(),
            loaders(),
            TrainConfig(steps=2),
            mse_step,
            task_mix={"a": 1},
            device="cpu",
            progress=False,
        )
    with pytest.raises(ValueError, match="task_mix"):
        train(
            DropoutNet(),
            loaders(),
            TrainConfig(steps=2),
            mse_step,
            task_mix={"a": 0, "b": 0},
            device="cpu",
            progress=False,
        )


def _tasks_of(task_mix, steps=30, **kw):
    h = train(
        DropoutNet(),
        loaders(),
        TrainConfig(steps=steps, seed=3, **kw),
        mse_step,
        task_mix=task_mix,
        device="cpu",
        progress=False,
    )
    return h.train["task"]


def test_task_phases_switch_the_mix_at_their_steps():
    tasks = _tasks_of([(1, {"a": 1}), (11, {"a": 1, "b": 1})])
    assert tasks[:10] == ["a"] * 10 and "b" in tasks[10:]
    # One phase is the plain mix, draw for draw.
    assert _tasks_of([(1, {"a": 2, "b": 1})]) == _tasks_of({"a": 2, "b": 1})


def test_resume_across_a_phase_boundary(tmp_path):
    phases = [(1, {"a": 1}), (13, {"b": 1, "a": 1})]  # the crash at 12 resumes from 10

    def run(step_fn, checkpoint_dir, resume=False):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=20, lr=0.01, save_every=5, seed=7, checkpoint_dir=checkpoint_dir)
        return train(
            DropoutNet(),
            loaders(),
            cfg,
            step_fn,
            task_mix=phases,
            device="cpu",
            progress=False,
            resume=resume,
        )

    straight = run(mse_step, str(tmp_path / "straight"))
    with pytest.raises(Crash):
        run(crashing_at(12), str(tmp_path / "crashed"))
    resumed = run(mse_step, str(tmp_path / "crashed"), resume=True)
    assert resumed.train["task"] == straight.train["task"]
    assert resumed.train["loss"] == pytest.approx(straight.train["loss"], abs=1e-6, rel=0)


@pytest.mark.parametrize(
    "phases, message",
    [
        ([(2, {"a": 1, "b": 1})], "start at step 1"),
        ([(1, {"a": 1}), (1, {"b": 1})], "increasing"),
        ([(1, {"a": 1, "c": 1})], r"\['c'\]"),
        ([(1, {"a": 1}), (5, {"a": 2})], r"\['b'\] have weight 0 in every phase"),
        ([(1, {"a": 1}), (5, {"a": 0, "b": 0})], "not all 0"),
        ([], "phases"),
        ([("1", {"a": 1, "b": 1})], "phases"),
    ],
)
def test_task_phases_reject_bad_schedules(phases, message):
    with pytest.raises(ValueError, match=message):
        _tasks_of(phases, steps=2)


# ---------------------------------------------------------------------------
# NaN stop and bad step functions
# ---------------------------------------------------------------------------


class NaNAtCall(nn.Module):
    def __init__(self, bad_call):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x):
        self.calls += 1
        out = self.linear(x)
        return out * float("nan") if self.calls == self.bad_call else out


def test_nan_loss_stops_naming_the_step_and_task():
    model = NaNAtCall(bad_call=3)
    with pytest.raises(FloatingPointError, match=r"step 3 \(task 'train'\)"):
        train(model, loaders()["a"], TrainConfig(steps=10), mse_step, device="cpu", progress=False)
    assert all(
        torch.isfinite(p).all() for p in model.parameters()
    )  # the NaN never reached the weights
    model = NaNAtCall(bad_call=2)
    with pytest.raises(FloatingPointError, match=r"step 2 \(task '(a|b)'\)"):
        train(model, loaders(), TrainConfig(steps=10), mse_step, device="cpu", progress=False)


def test_step_fn_must_return_a_loss():
    with pytest.raises(TypeError, match="'loss'"):
        train(
            DropoutNet(),
            loaders()["a"],
            TrainConfig(steps=2),
            lambda m, b, t: m(b["x"]).mean(),
            device="cpu",
            progress=False,
        )
    with pytest.raises(ValueError, match="requires grad"):
        train(
            DropoutNet(),
            loaders()["a"],
            TrainConfig(steps=2),
            lambda m, b, t: {"loss": torch.tensor(1.0)},
            device="cpu",
            progress=False,
        )


# ---------------------------------------------------------------------------
# Evaluation, best checkpoint, history
# ---------------------------------------------------------------------------


def test_best_checkpoint_keeps_the_best_eval(tmp_path):
    scores = iter([0.5, 0.8, 0.6])
    snapshots = {}

    def eval_fn(model):
        assert not model.training
        step = 2 * (len(snapshots) + 1)
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"val_accuracy": next(scores)}

    cfg = TrainConfig(
        steps=6, eval_every=2, keep_best_by="val_accuracy", checkpoint_dir=str(tmp_path)
    )
    model = DropoutNet()
    history = train(
        model, loaders()["a"], cfg, mse_step, eval_fn=eval_fn, device="cpu", progress=False
    )
    assert history.val["step"] == [2, 4, 6] and history.val["val_accuracy"] == [0.5, 0.8, 0.6]
    assert (history.best_step, history.best_value, history.best_metric) == (4, 0.8, "val_accuracy")
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == 4 and best["value"] == 0.8
    restored = load_weights(DropoutNet(), tmp_path / "best", map_location="cpu")
    for k, v in restored.state_dict().items():
        torch.testing.assert_close(v, snapshots[4][k], atol=0, rtol=0)
    state = torch.load(
        tmp_path / "last" / "trainer_state.pt", map_location="cpu", weights_only=True
    )
    assert state["step"] == 6 and History.from_dict(state["history"]).val == history.val


def test_best_checkpoint_of_a_pretrained_model_loads_with_load_pretrained(tmp_path):
    config = VQAConfig(
        vocab_size=12, num_answers=3, hidden_size=8, num_heads=2, classifier_hidden=8
    )
    model = QuestionOnly(config)
    ids = torch.randint(1, 12, (16, 5), generator=torch.Generator().manual_seed(0))
    data = [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(5, dtype=torch.bool),
            "answer": ids[i, 0] % 3,
        }
        for i in range(16)
    ]
    loader = DataLoader(data, batch_size=4, shuffle=True)

    def step_fn(m, batch, task):
        return {"loss": F.cross_entropy(m(batch), batch["answer"])}

    cfg = TrainConfig(steps=4, eval_every=2, keep_best_by="neg_loss", checkpoint_dir=str(tmp_path))
    batch = torch.utils.data.default_collate(data)
    train(
        model,
        loader,
        cfg,
        step_fn,
        eval_fn=lambda m: {"neg_loss": -step_fn(m, batch, "")["loss"]},
        device="cpu",
        progress=False,
    )
    loaded = load_pretrained(tmp_path / "last")
    torch.testing.assert_close(loaded(batch), model.eval()(batch))
    assert isinstance(load_pretrained(tmp_path / "best"), QuestionOnly)


def test_keep_best_by_must_be_an_eval_metric():
    cfg = TrainConfig(steps=2, eval_every=1, keep_best_by="val_accuracy")
    with pytest.raises(ValueError, match="val_accuracy"):
        train(
            DropoutNet(),
            loaders()["a"],
            cfg,
            mse_step,
            eval_fn=lambda m: {"accuracy": 1.0},
            device="cpu",
            progress=False,
        )


def test_history_round_trips_through_json():
    cfg = TrainConfig(steps=4, eval_every=2)
    history = train(
        DropoutNet(),
        loaders(),
        cfg,
        mse_step,
        eval_fn=lambda m: {"score": 1.0},
        device="cpu",
        progress=False,
    )
    again = History.from_dict(json.loads(json.dumps(history.to_dict())))
    assert again.to_dict() == history.to_dict()
    assert history.series("score") == ([2, 4], [1.0, 1.0])
    assert history.last_val()["step"] == 4 and history.step == 4
    for column in history.train.values():
        assert len(column) == 4


def test_to_device_keeps_structure():
    batch = {"a": torch.ones(2), "nested": [torch.zeros(1), (torch.ones(1), "text")], "n": 3}
    moved = to_device(batch, "cpu")
    assert (
        moved["n"] == 3
        and moved["nested"][1][1] == "text"
        and isinstance(moved["nested"][1], tuple)
    )
    assert torch.equal(moved["a"], batch["a"]) and moved["a"].device.type == "cpu"


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=0)


def test_stop_when_ends_the_run_after_the_first_evaluation_that_reaches_the_value(tmp_path):
    scores = iter([0.2, 0.6, 0.9, 0.99, 1.0])  # the third evaluation equals the value: that counts
    cfg = TrainConfig(
        steps=10, eval_every=2, stop_when=("accuracy", 0.9), checkpoint_dir=str(tmp_path)
    )
    history = train(
        DropoutNet(),
        loaders()["a"],
        cfg,
        mse_step,
        eval_fn=lambda m: {"accuracy": next(scores)},
        device="cpu",
        progress=False,
    )
    assert history.stopped_at == 6 and history.step == 6 and history.val["step"] == [2, 4, 6]
    assert history.train["lr"] == lr_schedule(cfg)[:6]  # the schedule keeps the full run's length
    state = torch.load(
        tmp_path / "last" / "trainer_state.pt", map_location="cpu", weights_only=True
    )
    assert state["step"] == 6 and History.from_dict(state["history"]).stopped_at == 6
    # Resuming a stopped run adds nothing (the scores iterator would move on if eval_fn were called again).
    again = train(
        DropoutNet(),
        loaders()["a"],
        cfg,
        mse_step,
        eval_fn=lambda m: {"accuracy": next(scores)},
        device="cpu",
        progress=False,
        resume=True,
    )
    assert again.step == 6 and again.stopped_at == 6 and next(scores) == 0.99


def test_resuming_a_stopped_run_with_another_stop_when_goes_on(tmp_path):
    scores = iter([0.5, 0.92, 0.95, 0.99])
    cfg = TrainConfig(
        steps=10, eval_every=2, stop_when=("accuracy", 0.9), checkpoint_dir=str(tmp_path)
    )
    first = train(
        DropoutNet(),
        loaders()["a"],
        cfg,
        mse_step,
        eval_fn=lambda m: {"accuracy": next(scores)},
        device="cpu",
        progress=False,
    )
    assert first.stopped_at == 4
    stricter = TrainConfig(
        steps=10, eval_every=2, stop_when=("accuracy", 0.99), checkpoint_dir=str(tmp_path)
    )
    with pytest.warns(UserWarning, match="stopped at step 4.*training goes on"):
        again = train(
            DropoutNet(),
            loaders()["a"],
            stricter,
            mse_step,
            eval_fn=lambda m: {"accuracy": next(scores)},
            device="cpu",
            progress=False,
            resume=True,
        )
    assert again.stopped_at == 8 and again.val["step"] == [2, 4, 6, 8]


def test_stop_mode_min_and_a_stop_at_the_last_evaluation():
    losses = iter([3.0, 2.0, 1.5])
    cfg = TrainConfig(steps=6, eval_every=2, stop_when=("loss", 1.0), stop_mode="min")
    history = train(
        DropoutNet(),
        loaders()["a"],
        cfg,
        mse_step,
        eval_fn=lambda m: {"loss": next(losses)},
        device="cpu",
        progress=False,
    )
    assert history.stopped_at is None and history.step == 6
    losses = iter([3.0, 2.0, 1.5])
    cfg = TrainConfig(steps=6, eval_every=2, stop_when=("loss", 2.5), stop_mode="min")
    history = train(
        DropoutNet(),
        loaders()["a"],
        cfg,
        mse_step,
        eval_fn=lambda m: {"loss": next(losses)},
        device="cpu",
        progress=False,
    )
    assert history.stopped_at == 4 and len(history.train["step"]) == 4
    losses = iter([3.0, 2.0, 1.5])
    cfg = TrainConfig(steps=6, eval_every=2, stop_when=("loss", 1.5), stop_mode="min")
    history = train(
        DropoutNet(),
        loaders()["a"],
        cfg,
        mse_step,
        eval_fn=lambda m: {"loss": next(losses)},
        device="cpu",
        progress=False,
    )
    assert history.stopped_at == 6 and history.step == 6  # met at the last evaluation


def test_stop_mode_is_not_best_mode():
    """keep_best_by a loss (best_mode "min") must not turn an accuracy target around."""
    values = iter(
        [
            {"loss": 2.0, "accuracy": 0.3},
            {"loss": 1.0, "accuracy": 0.95},
            {"loss": 0.5, "accuracy": 1.0},
        ]
    )
    cfg = TrainConfig(
        steps=6, eval_every=2, keep_best_by="loss", best_mode="min", stop_when=("accuracy", 0.9)
    )
    history = train(
        DropoutNet(),
        loaders()["a"],
        cfg,
        mse_step,
        eval_fn=lambda m: next(values),
        device="cpu",
        progress=False,
    )
    assert history.stopped_at == 4 and history.best_step == 4


def test_stop_when_is_checked():
    for bad in (("accuracy",), (0.9, "accuracy"), ("accuracy", float("nan")), ("accuracy", True)):
        with pytest.raises(ValueError, match="stop_when"):
            TrainConfig(eval_every=1, stop_when=bad)
    with pytest.raises(ValueError, match="set eval_every"):
        TrainConfig(stop_when=("accuracy", 0.9))
    with pytest.raises(ValueError, match="stop_mode"):
        TrainConfig(eval_every=1, stop_when=("accuracy", 0.9), stop_mode="up")
    with pytest.raises(ValueError, match="stop_when.*eval_fn"):
        train(
            DropoutNet(),
            loaders()["a"],
            TrainConfig(steps=2, eval_every=1, stop_when=("accuracy", 0.9)),
            mse_step,
            device="cpu",
            progress=False,
        )
    with pytest.raises(ValueError, match="'accuracy' is not among eval_fn's metrics"):
        train(
            DropoutNet(),
            loaders()["a"],
            TrainConfig(steps=2, eval_every=1, stop_when=("accuracy", 0.9)),
            mse_step,
            eval_fn=lambda m: {"score": 1.0},
            device="cpu",
            progress=False,
        )


def _stop_on_one_rank(rank, store_path, out_dir):
    import torch.distributed as dist

    # A timeout, so that a rank left waiting fails the test instead of hanging it.
    dist.init_process_group(
        "gloo",
        store=dist.FileStore(store_path, 2),
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        # Each rank scores its own shard: the mean over ranks is 0.5 at the first evaluation
        # (rank 1 alone is above 0.9) and 0.95 at the second.
        scores = iter([0.0, 0.9] if rank == 0 else [1.0, 1.0])
        cfg = TrainConfig(steps=10, eval_every=2, stop_when=("accuracy", 0.9))
        history = train(
            DropoutNet(),
            loaders()["a"],
            cfg,
            mse_step,
            eval_fn=lambda m: {"accuracy": next(scores)},
            device="cpu",
            progress=False,
        )
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"step": history.step, "stopped_at": history.stopped_at}, f)
    finally:
        dist.destroy_process_group()


def test_stop_when_stops_every_ddp_rank_at_the_same_step_on_the_mean_over_ranks(tmp_path):
    """Were one rank to stop alone, the other would wait for it in DDP's all-reduce for ever."""
    torch.multiprocessing.start_processes(
        _stop_on_one_rank,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {
            "step": 4,
            "stopped_at": 4,
        }
