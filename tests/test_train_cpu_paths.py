"""The CPU fast paths of the training loop (chapter 7): bf16 autocast on CPU and torch.compile on CPU.

* ``TrainConfig(cpu_amp=...)``: a few steps under bf16 autocast give the fp32 losses to a stated
  tolerance, the detection of native bf16 falls back to fp32 with a warning, a bad value names the
  field, the default leaves every existing run (and checkpoint fingerprint) as it was;
* ``TrainConfig(compile=True)`` on CPU (inductor): the book's models (chapter 3's cross-attention,
  ViLBERT and UNITER pretraining) give the eager losses, step for step, to a stated tolerance;
* ``python -m fusionlib.bench train`` runs end to end at a tiny size and writes its JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fusionlib import runtime
from fusionlib.bench import train as bench_train
from fusionlib.train import _RESULT_FIELDS, CPU_AMP_MODES, TrainConfig, cpu_bf16_enabled, train

# Stated tolerances.
# bf16 keeps 8 bits of mantissa (~0.4% per rounding); through a few layers and 5 AdamW steps the loss
# of a run stays within 1% of fp32's (measured on chapter 3's tiny model: at most 0.12%).
BF16_LOSS_RTOL = 0.01
# Inductor fuses and reorders float32 arithmetic: the same losses to 1e-3 relative over 4 updates.
# Measured: chapter 3's and ViLBERT's equal to ~1e-7; UNITER's ITM step 3e-4 (its word-region
# alignment iterates optimal transport, which amplifies rounding differences).
COMPILE_LOSS_RTOL = 1e-3


@pytest.fixture(autouse=True)
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


class Repeat(Dataset):
    """The same batch ``n`` times (``DataLoader(batch_size=None)`` yields it as is)."""

    def __init__(self, batch, n=64):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.batch


def run(recipe, config, tasks=None):
    """Train a fresh copy of ``recipe``'s model with ``config``; the losses."""
    model = recipe.make_model()
    names = tasks or ("train",)
    data = {t: DataLoader(Repeat(recipe.batch), batch_size=None) for t in names}
    history = train(
        model,
        data if tasks else data["train"],
        config,
        lambda m, b, t: {
            **recipe.step_fn(m, b, t),
            "bf16": torch.tensor(float(_dtype_seen(m, b) == torch.bfloat16)),
        },
        device="cpu",
        progress=False,
    )
    return history.train["loss"], history.train["bf16"], history.train["task"]


def _dtype_seen(model, batch):
    """The dtype a linear layer computes in under the ambient autocast (what the step ran in)."""
    x = torch.ones(1, 4)
    return torch.nn.functional.linear(x, torch.ones(2, 4)).dtype


def ch03():
    return bench_train.build_recipe("ch03_cross_attention", "cpu", tiny=True)


# ---------------------------------------------------------------------------
# bf16 autocast on CPU
# ---------------------------------------------------------------------------


def test_cpu_amp_defaults_to_off_and_stays_out_of_the_fingerprinted_fields():
    assert TrainConfig().cpu_amp == "off" and CPU_AMP_MODES == ("off", "auto", "bf16")
    # The book's checkpoint specs hash the _RESULT_FIELDS of the train config: adding a name there
    # would change every fingerprint (tests/test_golden.py would fail to find its checkpoints).
    assert "cpu_amp" not in _RESULT_FIELDS
    assert not cpu_bf16_enabled(TrainConfig(), "cpu")
    assert not cpu_bf16_enabled(TrainConfig(cpu_amp="bf16"), "meta")  # CUDA follows config.amp


@pytest.mark.parametrize("bad", ["on", "BF16", True, None, 1])
def test_a_bad_cpu_amp_names_the_field(bad):
    with pytest.raises(ValueError, match=r"cpu_amp must be one of \('off', 'auto', 'bf16'\)"):
        TrainConfig(cpu_amp=bad)


def test_bf16_on_cpu_gives_the_fp32_losses_within_the_tolerance():
    recipe = ch03()
    config = TrainConfig(steps=5, lr=2e-3, warmup_steps=1, amp=False)
    fp32, fp32_flags, _ = run(recipe, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # emulated bf16 on a CPU without it
        bf16, bf16_flags, _ = run(recipe, TrainConfig(**{**config.to_dict(), "cpu_amp": "bf16"}))
    assert fp32_flags == [0.0] * 5 and bf16_flags == [1.0] * 5  # it did run under bf16
    assert fp32 != bf16  # ... which changed the arithmetic
    for a, b in zip(fp32, bf16):
        assert math.isfinite(b) and abs(a - b) <= BF16_LOSS_RTOL * abs(a), (fp32, bf16)


def test_auto_falls_back_to_fp32_with_a_warning_when_the_cpu_has_no_native_bf16(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: (False, "forced off by a test"))
    recipe = ch03()
    config = TrainConfig(steps=3, lr=2e-3, amp=False)
    fp32, _, _ = run(recipe, config)
    with pytest.warns(RuntimeWarning, match=r"forced off by a test.*training in fp32"):
        auto, flags, _ = run(recipe, TrainConfig(steps=3, lr=2e-3, amp=False, cpu_amp="auto"))
    assert flags == [0.0] * 3 and auto == fp32  # exactly the fp32 run
    with pytest.warns(RuntimeWarning, match="slower than fp32"):
        assert cpu_bf16_enabled(TrainConfig(cpu_amp="bf16"), "cpu")  # forced: runs, with a warning


def test_auto_uses_bf16_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: (True, "a test says so"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when bf16 is native
        _, flags, _ = run(ch03(), TrainConfig(steps=2, amp=False, cpu_amp="auto"))
    assert flags == [1.0, 1.0]


def test_the_detection_answers_with_a_reason():
    supported, why = runtime.cpu_bf16_support()
    assert isinstance(supported, bool) and why
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512_bf16" in flags or " amx_bf16" in flags:
        assert supported, why


def test_resuming_with_another_cpu_amp_warns(tmp_path):
    recipe = ch03()
    config = TrainConfig(steps=2, amp=False, checkpoint_dir=str(tmp_path), save_every=1)
    run(recipe, config)
    state_path = tmp_path / "last" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["train_config"]["cpu_amp"] == "off"
    other = TrainConfig(**{**config.to_dict(), "cpu_amp": "bf16"})
    model = recipe.make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # emulated-bf16 note on some CPUs
        with pytest.warns(UserWarning, match=r"different \['cpu_amp'\]"):
            train(
                model,
                DataLoader(Repeat(recipe.batch), batch_size=None),
                other,
                recipe.step_fn,
                device="cpu",
                progress=False,
                resume=True,
            )
    # A checkpoint written before cpu_amp existed counts as "off": resuming it with "off" is silent.
    del state["train_config"]["cpu_amp"]
    torch.save(state, state_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(
            recipe.make_model(),
            DataLoader(Repeat(recipe.batch), batch_size=None),
            config,
            recipe.step_fn,
            device="cpu",
            progress=False,
            resume=True,
        )


# ---------------------------------------------------------------------------
# torch.compile on CPU
# ---------------------------------------------------------------------------


def _inductor_cannot_build() -> str | None:
    """Why inductor cannot compile C++ here, or None."""
    try:
        from torch._inductor import cpp_builder

        compiler = cpp_builder.get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - any failure to find one means "cannot"
        return f"inductor finds no C++ compiler: {str(error).splitlines()[0][:200]}"
    if shutil.which(compiler) is None and not os.path.exists(compiler):
        return f"inductor's C++ compiler {compiler!r} is not on PATH"
    return None


@pytest.mark.parametrize(
    "name, tasks",
    [
        ("ch03_cross_attention", None),
        ("vilbert_pretraining", None),
        ("uniter_pretraining", ("itm", "mlm")),
    ],
)
def test_compiled_training_on_cpu_gives_the_eager_losses(name, tasks):
    why = _inductor_cannot_build()
    if why:
        pytest.skip(why)
    torch._dynamo.reset()
    recipe = bench_train.build_recipe(name, "cpu", tiny=True)
    config = TrainConfig(steps=4, lr=1e-3, amp=False, seed=3)
    eager, _, eager_tasks = run(recipe, config, tasks)
    compiled, _, compiled_tasks = run(
        recipe, TrainConfig(**{**config.to_dict(), "compile": True}), tasks
    )
    torch._dynamo.reset()
    assert compiled_tasks == eager_tasks
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= COMPILE_LOSS_RTOL * abs(a), (eager, compiled)


# ---------------------------------------------------------------------------
# python -m fusionlib.bench train
# ---------------------------------------------------------------------------


def test_bench_train_runs_end_to_end_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "bench_train.json"
    report = bench_train.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--repeats",
            "3",
            "--warmup",
            "0",
            "--variants",
            "eager_fp32",
            "eager_bf16",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["device"] == "cpu" and saved["threads"] == 1 and saved["tiny"] is True
    assert saved["peak_bf16_flops"] is None and "peak unknown" in saved["peak_note"]
    assert set(saved["cpu_bf16"]) == {"native", "why"}
    assert set(saved["recipes"]) == set(bench_train.RECIPES)
    assert (
        saved["recipes"]["uniter_pretraining"]["steps_per_call"] == 6
    )  # itm 2, mlm 2, mrfr, mrc_kl
    for name, recipe in saved["recipes"].items():
        assert recipe["errors"] == {}, name
        assert set(recipe["variants"]) == {"eager_fp32", "eager_bf16"}
        for v in recipe["variants"].values():
            assert v["q25_ms"] <= v["median_ms"] <= v["q75_ms"]
            assert v["steps_per_s"] > 0 and v["gflop_per_step"] > 0
            assert v["samples_per_s"] == pytest.approx(recipe["batch_size"] * v["steps_per_s"])
            assert v["fraction_of_bf16_peak"] is None
            assert v["speedup_vs_eager_fp32"]["rounds"] == 3
            assert math.isfinite(v["final_loss"])
    assert "UNITER pretraining" in printed and "samples/s" in printed


def test_bench_train_records_a_failed_compile_and_keeps_the_rest(monkeypatch):
    def cannot_compile(model, *args, **kwargs):
        raise RuntimeError("compile failed: no C compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", cannot_compile)
    recipe = bench_train.build_recipe("ch03_cross_attention", "cpu", tiny=True)
    row = bench_train.bench_recipe(
        recipe,
        torch.device("cpu"),
        ("eager_fp32", "compiled_fp32"),
        repeats=1,
        warmup=0,
        say=lambda *a, **k: None,
    )
    assert row["errors"] == {"compiled_fp32": "compile failed: no C compiler found"}
    assert set(row["variants"]) == {"eager_fp32"} and row["variants"]["eager_fp32"]["median_ms"] > 0


def test_bench_train_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench_train.main(["--recipes", "ch99"])
    with pytest.raises(SystemExit):
        bench_train.main(["--threads", "0"])
    with pytest.raises(ValueError, match="recipe must be one of"):
        bench_train.build_recipe("ch99")
