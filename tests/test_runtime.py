"""fusionlib.runtime: profiles, seeding, autocast, results files."""

import json
import time

import pytest
import torch

from fusionlib import runtime


def test_profile_from_environment(monkeypatch):
    for name in runtime.PROFILES:
        monkeypatch.setenv("FUSIONLIB_PROFILE", name)
        assert runtime.profile() == name
    monkeypatch.setenv("FUSIONLIB_PROFILE", "huge")
    with pytest.raises(ValueError, match="FUSIONLIB_PROFILE must be one of"):
        runtime.profile()
    monkeypatch.delenv("FUSIONLIB_PROFILE")
    assert runtime.profile() == ("gpu" if torch.cuda.is_available() else "cpu")


def test_pick(monkeypatch):
    monkeypatch.setenv("FUSIONLIB_PROFILE", "cpu")
    assert runtime.pick(smoke=1, cpu=2, gpu=3) == 2
    assert runtime.pick(smoke=1, cpu=2, gpu=3, profile_name="gpu") == 3
    with pytest.raises(ValueError, match="profile_name"):
        runtime.pick(smoke=1, cpu=2, gpu=3, profile_name="tpu")


def test_seed_everything_repeats():
    g1 = runtime.seed_everything(7)
    a = torch.randn(3), torch.randn(2, generator=g1)
    g2 = runtime.seed_everything(7)
    b = torch.randn(3), torch.randn(2, generator=g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="seed"):
        runtime.seed_everything(-1)


def test_device_and_autocast_on_cpu():
    assert runtime.device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            runtime.device("cuda")
    with runtime.autocast("cpu"):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32  # a no-op on CPU


def test_timer_and_format(capsys):
    with runtime.Timer("work") as t:
        sum(range(1000))
    assert t.seconds >= 0
    assert "work: wall time" in capsys.readouterr().out
    assert runtime.format_seconds(75.25) == "1 min 15.2 s"


def test_write_and_read_results(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLIB_PROFILE", "cpu")
    path = runtime.write_results(
        "99_test", {"accuracy": torch.tensor(0.5)}, directory=tmp_path, seed=3
    )
    record = json.loads(open(path).read())
    assert (
        record["metrics"] == {"accuracy": 0.5}
        and record["seed"] == 3
        and record["profile"] == "cpu"
    )
    assert runtime.read_results("99_test", directory=tmp_path)["metrics"]["accuracy"] == 0.5
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="chapter"):
        runtime.write_results("a/b", {}, directory=tmp_path)


def test_smoke_results_never_touch_committed_results(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSIONLIB_ROOT", str(tmp_path))
    monkeypatch.setenv("FUSIONLIB_PROFILE", "smoke")
    assert runtime.results_dir().startswith(runtime.cache_dir())
    monkeypatch.setenv("FUSIONLIB_PROFILE", "cpu")
    assert runtime.results_dir() == str(tmp_path / "results")


def test_summary_mentions_profile_and_versions():
    line = runtime.summary()
    assert "profile=" in line and "torch" in line and "fusionlib" in line


def test_step_generator_passes_a_generator_through_or_draws_one_from_the_global_seed():
    given = torch.Generator().manual_seed(3)
    assert runtime.step_generator(given) is given
    torch.manual_seed(11)
    first = torch.rand(4, generator=runtime.step_generator())
    torch.manual_seed(11)
    again = torch.rand(4, generator=runtime.step_generator())
    assert torch.equal(first, again)  # the same global state, the same draws
    assert not torch.equal(
        first, torch.rand(4, generator=runtime.step_generator())
    )  # the next step: new ones
    with pytest.raises(TypeError, match="generator"):
        runtime.step_generator(3)


def test_results_of_a_larger_recipe_are_kept(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("FUSIONLIB_ROOT", str(tmp_path))
    monkeypatch.setenv("FUSIONLIB_PROFILE", "cpu")
    (tmp_path / "results").mkdir()
    full = {"chapter": "09_x", "profile": "gpu", "metrics": {"accuracy": 0.9}}
    (tmp_path / "results" / "09_x.json").write_text(json.dumps(full))
    path = runtime.write_results("09_x", {"accuracy": 0.7})
    assert json.loads((tmp_path / "results" / "09_x.json").read_text()) == full
    assert path == str(tmp_path / ".cache" / "results-small" / "09_x.json")
    assert "holds the full recipe's results and is kept" in capsys.readouterr().out
    assert runtime.read_results("09_x")["metrics"] == {"accuracy": 0.7}  # what this run wrote


def test_the_same_results_leave_the_file_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUSIONLIB_ROOT", str(tmp_path))
    monkeypatch.setenv("FUSIONLIB_PROFILE", "gpu")
    path = runtime.write_results("09_y", {"accuracy": 0.5, "curve": [0.1, 0.2]}, seed=0)
    before = open(path).read()
    assert runtime.write_results("09_y", {"accuracy": 0.5, "curve": [0.1, 0.2]}, seed=0) == path
    assert "left as it is" in capsys.readouterr().out and open(path).read() == before
    runtime.write_results(
        "09_y", {"accuracy": 0.6, "curve": [0.1, 0.2]}, seed=0
    )  # same recipe, new numbers
    assert runtime.read_results("09_y")["metrics"]["accuracy"] == 0.6
    assert runtime.read_results("09_y")["recipe"] == "full"


def test_wall_times_alone_do_not_rewrite_the_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUSIONLIB_ROOT", str(tmp_path))
    monkeypatch.setenv("FUSIONLIB_PROFILE", "cpu")
    recorded = {"accuracy": 0.5, "train_seconds": 12.0, "per_split": {"feature_seconds": [1.0]}}
    path = runtime.write_results("09_z", recorded)
    before = open(path).read()
    rerun = {"accuracy": 0.5, "train_seconds": 13.5, "per_split": {"feature_seconds": [1.2]}}
    runtime.write_results("09_z", rerun)  # a re-run on a machine that was busier
    assert open(path).read() == before
    out = capsys.readouterr().out
    assert "left as it is (its wall times are those of the run it records" in out
    runtime.write_results("09_z", {**rerun, "accuracy": 0.6})  # a new result is written, times too
    assert runtime.read_results("09_z")["metrics"]["train_seconds"] == 13.5
    runtime.write_results("09_z", {"accuracy": 0.6})  # a field that went away is a change
    assert "train_seconds" not in runtime.read_results("09_z")["metrics"]


def test_format_percent():
    assert runtime.format_percent(0.9361) == "93.6%"
    assert runtime.format_percent(0.5, digits=0) == "50%"


def test_time_budget_stops_the_block_holds_a_record_and_restores_the_handler():
    import signal

    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(runtime.BudgetSpent):
        with runtime.time_budget(0.05):
            time.sleep(2)
    assert signal.getsignal(signal.SIGALRM) is before
    finished = []
    with pytest.raises(runtime.BudgetSpent):
        with runtime.time_budget(0.05):
            with runtime.budget_held():
                time.sleep(0.2)  # the alarm fires here and waits for the block to end
                finished.append(True)
            time.sleep(2)
    assert finished == [True]
    with runtime.time_budget(None):
        pass
    with pytest.raises(ValueError, match="seconds must be a positive number"):
        with runtime.time_budget(0):
            pass
