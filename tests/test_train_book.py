"""scripts/train_book.py: the smoke recipe trains, a killed run resumes to the same weights, --budget stops."""

import os
import signal
import subprocess
import sys
import time

import pytest

from fusionlib import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "ch03/relation_network"


def command(out, work, *extra):
    return [
        sys.executable,
        os.path.join(REPO, "scripts", "train_book.py"),
        "--recipe",
        "smoke",
        "--only",
        NAME,
        "--out",
        str(out),
        "--work",
        str(work),
        "--no-progress",
        *extra,
    ]


def run(out, work, *extra):
    return subprocess.run(
        command(out, work, *extra), cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted smoke run of one checkpoint."""
    root = tmp_path_factory.mktemp("straight")
    done = run(root / "out", root / "work")
    assert done.returncode == 0, done.stdout + done.stderr
    return root, done


def test_smoke_recipe_writes_weights_and_manifest(straight):
    root, done = straight
    record = checkpoints.read_manifest(root / "out")[NAME]
    assert record.recipe == "smoke" and record.steps == 30 and record.batch_size == 32
    assert set(record.metrics) >= {"accuracy", "relational_accuracy", "non_relational_accuracy"}
    assert os.path.isfile(root / "out" / NAME / "model.safetensors")
    assert not os.path.exists(root / "work" / NAME)  # training state is removed once saved
    again = run(root / "out", root / "work")  # a second run finds it up to date
    assert again.returncode == 0 and f"{NAME}: up to date" in again.stdout
    retrained = run(
        root / "out", root / "work", "--retrain"
    )  # --retrain trains it anyway, to the same weights
    assert retrained.returncode == 0 and f"{NAME}: training the smoke recipe" in retrained.stdout
    assert checkpoints.read_manifest(root / "out")[NAME].sha256 == record.sha256


def test_a_killed_run_resumes_to_the_same_weights(straight, tmp_path):
    root, _ = straight
    states = tmp_path / "work" / NAME  # <recipe fingerprint>/last/trainer_state.pt under it

    def saved():
        return list(states.glob("*/last/trainer_state.pt"))

    proc = subprocess.Popen(
        command(tmp_path / "out", tmp_path / "work"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not saved() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert saved(), "the run ended before its first save: nothing was killed mid-training"
    assert NAME not in checkpoints.read_manifest(tmp_path / "out")
    # The state of an older recipe of the same checkpoint (another fingerprint) must not be resumed.
    stale = states / "0000000000000000" / "last"
    stale.mkdir(parents=True)
    (stale / "trainer_state.pt").write_bytes(b"an older recipe's state")
    resumed = run(tmp_path / "out", tmp_path / "work")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    straight_record = checkpoints.read_manifest(root / "out")[NAME]
    resumed_record = checkpoints.read_manifest(tmp_path / "out")[NAME]
    assert resumed_record.sha256 == straight_record.sha256
    assert resumed_record.metrics == straight_record.metrics


def test_budget_stops_with_status_3_and_keeps_nothing_half_written(tmp_path):
    # The budget must run out before the run can finish on any machine: building
    # the smoke world alone takes longer than 50 ms, and a fast machine trains the
    # smoke recipe in well under a second.
    stopped = run(tmp_path / "out", tmp_path / "work", "--budget", "0.05")
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    assert "run again to resume" in stopped.stdout
    assert NAME not in checkpoints.read_manifest(tmp_path / "out")
    resumed = run(tmp_path / "out", tmp_path / "work")  # and the next run goes on to the end
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert NAME in checkpoints.read_manifest(tmp_path / "out")
