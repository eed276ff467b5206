"""fusionlib.experiments.ablation and scripts/ablation.py: chapter 6b's rows and records (smoke world).

The two smoke runs (``none`` and ``MLM``, seed 0) are made once, by the
script, and every test of a record reads those: most of a run's time is the
test split's retrieval, every (image, text) pair through the ITM head.
"""

import importlib.util
import json
import os
from functools import partial

import pytest
import torch

from fusionlib import checkpoints
from fusionlib.checkpoints import fingerprint
from fusionlib.experiments import ablation, pretrain
from fusionlib.models import uniter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [
    "none",
    "MLM",
    "MLM+ITM",
    "MLM+ITM+MRC-kl",
    "+MRFR",
    "+WRA",
    "+WRA, joint masking",
]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "ablation_script", os.path.join(REPO, "scripts", "ablation.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def recorded(script, tmp_path_factory):
    """The script end to end on the smoke recipe: ``none`` and ``MLM``, seed 0; then once more."""
    root = tmp_path_factory.mktemp("ablation")
    out = root / "out.jsonl"
    argv = ["--recipe", "smoke", "--rows", "none", "MLM", "--seeds", "0"]
    argv += ["--out", str(out), "--work", str(root / "work"), "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSIONLIB_PROFILE", "smoke")  # main sets it from the recipe; restored after
        first = script.main(argv)
        lines = out.read_text().splitlines()
        second = script.main(argv)
    return {"root": root, "out": out, "first": first, "second": second, "lines": lines}


def numbers(values, prefix=""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from numbers(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# ---------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------


def test_rows_are_uniters_table_2_in_order():
    assert list(ablation.ABLATION_ROWS) == ROWS
    assert [r.against for r in ablation.ABLATION_ROWS.values()] == [None, *ROWS[:5], "+WRA"]
    assert [r.label for r in ablation.ABLATION_ROWS.values()] == ROWS
    with pytest.raises(TypeError):  # read-only: a row cannot change under its records
        ablation.ABLATION_ROWS["MLM"] = ablation.ABLATION_ROWS["none"]


def test_each_row_keeps_uniters_weights_for_the_tasks_it_keeps():
    rows = ablation.ABLATION_ROWS
    full = pretrain.task_mix("uniter")
    assert rows["none"].mix() is None and not rows["none"].pretrains
    assert rows["MLM"].mix() == {k: v for k, v in full.items() if k.startswith("mlm@")}
    assert rows["MLM+ITM"].mix() == {k: v for k, v in full.items() if k[:3] in ("mlm", "itm")}
    assert set(rows["MLM+ITM+MRC-kl"].mix()) == set(full) - {"mrfr@captions", "mrfr@descriptions"}
    for label in ("+MRFR", "+WRA", "+WRA, joint masking"):
        assert rows[label].mix() == full
    assert [r.trains_itm for r in rows.values()] == [False, False] + [True] * 5


def test_every_row_names_the_paper_row_it_repeats():
    assert list(ablation.PAPER_TABLE_2) == ROWS
    numbers = {row.number for row in ablation.PAPER_TABLE_2.values()}
    assert all(r.against in numbers for r in ablation.PAPER_TABLE_2.values() if r.against)
    changes = ablation.paper_changes()
    assert list(changes) == ROWS[1:]  # the baseline has nothing to be compared with
    assert changes["+WRA"] == pytest.approx(400.93 - 399.97)
    # The paper's joint-masking row has no WRA: it is compared with row 10, not with +WRA's row 11.
    assert changes["+WRA, joint masking"] == pytest.approx(396.51 - 399.97)


def test_wra_and_masking_change_only_the_rows_that_name_them(book):
    configs = {
        row: ablation.ablation_spec(row, 0, book, "smoke")["pretrain"]
        for row in ROWS
        if row != "none"
    }
    use_wra = {row: spec["model_config"]["use_wra"] for row, spec in configs.items()}
    masking = {row: spec["model_config"]["masking"] for row, spec in configs.items()}
    assert use_wra == {row: row.startswith("+WRA") for row in configs}
    assert masking == {row: "joint" if "joint" in row else "conditional" for row in configs}
    # +WRA is the book's UNITER (chapter 6): the same spec as its pretrained checkpoint.
    assert configs["+WRA"] == pretrain.pretrain_spec("uniter", book, "smoke", seed=0)
    assert configs["+MRFR"] != configs["+WRA"]


@pytest.mark.parametrize("recipe", list(pretrain.PRETRAIN_RECIPES))
def test_every_pretrained_row_starts_with_mlm_alone(book, recipe):
    first = pretrain.PRETRAIN_RECIPES[recipe].mlm_first_steps
    assert first > 0
    for row in ROWS[1:]:
        schedule = ablation.ablation_spec(row, 0, book, recipe)["pretrain"]["task_mix"]
        assert schedule[0] == (1, {"mlm@captions": 5.0, "mlm@descriptions": 1.0})
        assert schedule[1] == (first + 1, ablation.ABLATION_ROWS[row].mix())
    mlm_phase = ablation.ablation_spec("MLM", 0, book, recipe)["pretrain"]["task_mix"][1][1]
    assert mlm_phase and all(task.startswith("mlm@") for task in mlm_phase)


def test_fingerprints_differ_by_row_and_seed_and_are_stable(book):
    prints = {
        (row, seed): fingerprint(ablation.ablation_spec(row, seed, book, "smoke"))
        for row in ROWS
        for seed in (0, 1)
    }
    assert len(set(prints.values())) == len(prints)
    again = fingerprint(ablation.ablation_spec("MLM+ITM", 1, book, "smoke"))
    assert again == prints[("MLM+ITM", 1)]
    assert fingerprint(ablation.ablation_spec("MLM", 0, book, "small")) != prints[("MLM", 0)]
    none = ablation.ablation_spec("none", 0, book, "smoke")
    assert none["pretrain"] is None and none["vqa"]["start"] == "scratch"
    mlm = ablation.ablation_spec("MLM", 0, book, "smoke")
    assert mlm["vqa"]["start"] == fingerprint(mlm["pretrain"]) and mlm["vqa"]["labels"] == "low"


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, seed, recipe, named",
    [
        ("MLM+MRFR", 0, "smoke", "row"),
        (None, 0, "smoke", "row"),
        ("MLM", -1, "smoke", "seed"),
        ("MLM", 1.0, "smoke", "seed"),
        ("MLM", True, "smoke", "seed"),
        ("MLM", 0, "tiny", "recipe"),
    ],
)
def test_bad_input_names_the_argument(book, row, seed, recipe, named):
    for call in (
        lambda: ablation.ablation_spec(row, seed, book, recipe),
        # Checked before anything is built or trained: no data needed to fail.
        lambda: ablation.run_ablation(row, seed, book, None, None, recipe, device="cpu"),
    ):
        with pytest.raises(ValueError, match=rf"^{named} must be ") as error:
            call()
        given = {"row": row, "seed": seed, "recipe": recipe}[named]
        assert str(error.value).endswith(f"got {given!r}")


def test_a_row_must_name_uniters_objectives_and_maskings():
    with pytest.raises(ValueError, match="objectives must be"):
        ablation.AblationRow("MLM+WRA", ("mlm", "wra"))
    with pytest.raises(ValueError, match="masking must be one of"):
        ablation.AblationRow("MLM", ("mlm",), masking="both")


# ---------------------------------------------------------------------------
# Summaries of hand-made records
# ---------------------------------------------------------------------------


def record(row, seed, accuracy, relational, recipe="smoke"):
    return {
        "row": row,
        "seed": seed,
        "recipe": recipe,
        "metrics": {"vqa": {"accuracy": accuracy, "relational_accuracy": relational}},
        "seconds": {"pretrain": 10.0 * seed, "finetune": 1.0},
    }


HAND_MADE = [
    record("MLM", 1, 0.80, 0.50),  # out of order: the summary follows ABLATION_ROWS
    record("none", 0, 0.50, 0.40),
    record("none", 1, 0.60, 0.60),
    record("MLM", 0, 0.70, 0.45),
    record("MLM+ITM", 0, 0.90, 0.70),
    record("+WRA, joint masking", 0, 0.90, 0.70),  # +WRA, its comparison, is missing
]


def test_summarise_gives_mean_and_range_per_row():
    summary = ablation.summarise(HAND_MADE)
    assert list(summary) == ["none", "MLM", "MLM+ITM", "+WRA, joint masking"]
    assert summary["MLM"]["seeds"] == [0, 1]
    accuracy = summary["MLM"]["metrics"]["vqa.accuracy"]
    assert accuracy["mean"] == pytest.approx(0.75)
    assert (accuracy["min"], accuracy["max"], accuracy["n"]) == (0.70, 0.80, 2)
    assert accuracy["shown"] == "0.750 (0.700–0.800)"
    assert summary["MLM+ITM"]["metrics"]["vqa.accuracy"]["shown"] == "0.900"
    assert summary["none"]["seconds"]["pretrain"]["max"] == 10.0


def test_row_effects_call_a_change_real_only_beyond_the_seeds_spread():
    effects = ablation.row_effects(ablation.summarise(HAND_MADE))
    assert set(effects) == {"MLM", "MLM+ITM"}  # none has no row before it; joint lacks +WRA
    mlm = effects["MLM"]
    assert mlm["against"] == "none" and mlm["seeds"] == (2, 2)
    # Accuracy: none 0.50-0.60, MLM 0.70-0.80 -> the ranges do not overlap.
    assert mlm["metrics"]["vqa.accuracy"]["change"] == pytest.approx(0.20)
    assert mlm["metrics"]["vqa.accuracy"]["exceeds_spread"] is True
    # Relational: none 0.40-0.60, MLM 0.45-0.50 -> they overlap: not called real.
    relational = mlm["metrics"]["vqa.relational_accuracy"]
    assert relational["change"] == pytest.approx(-0.025)
    assert relational["exceeds_spread"] is False and "within" in relational["verdict"]
    # One seed of MLM+ITM: no spread to judge by, whatever the change.
    one = effects["MLM+ITM"]["metrics"]["vqa.accuracy"]
    assert one["change"] == pytest.approx(0.15)
    assert one["exceeds_spread"] is None and "one seed" in one["verdict"]


def test_summarise_refuses_records_it_cannot_average():
    with pytest.raises(ValueError, match=r"one record per \(row, seed\)"):
        ablation.summarise([record("MLM", 0, 0.7, 0.4), record("MLM", 0, 0.8, 0.5)])
    with pytest.raises(ValueError, match="one recipe"):
        ablation.summarise([record("MLM", 0, 0.7, 0.4), record("MLM", 1, 0.8, 0.5, "small")])
    with pytest.raises(ValueError, match="^row must be one of"):
        ablation.summarise([record("MLM+MRFR", 0, 0.7, 0.4)])
    with pytest.raises(ValueError, match="^seed must be an int"):
        ablation.summarise([record("MLM", -2, 0.7, 0.4)])
    assert ablation.summarise([]) == {} and ablation.row_effects({}) == {}


# ---------------------------------------------------------------------------
# The script, end to end on the smoke recipe
# ---------------------------------------------------------------------------


def test_the_script_writes_one_line_per_run_then_skips_them(recorded):
    assert recorded["first"] == 0 and recorded["second"] == 0
    assert len(recorded["lines"]) == 2
    assert recorded["out"].read_text().splitlines() == recorded["lines"]  # nothing appended again
    assert not any(recorded["root"].glob("work/*"))  # each run's state is removed once recorded


def test_the_records_hold_what_chapter_6b_reads(recorded, book):
    records = [json.loads(line) for line in recorded["lines"]]
    assert [(r["row"], r["seed"], r["recipe"]) for r in records] == [
        ("none", 0, "smoke"),
        ("MLM", 0, "smoke"),
    ]
    for r in records:
        assert r["fingerprint"] == fingerprint(ablation.ablation_spec(r["row"], 0, book, "smoke"))
        assert r["itm_trained"] is False  # neither row trains the ITM head retrieval ranks by
        assert set(r["metrics"]["vqa"]) == set(ablation.VQA_KEYS)
        assert set(r["metrics"]["retrieval"]) == {"identification", "captions"}
        for kind in r["metrics"]["retrieval"].values():
            assert set(kind) == {"model", "chance", "ceiling"}
            assert "t2i_R@1" in kind["model"] and "truth_t2i_R@1" in kind["model"]
        values = dict(numbers(r["metrics"]))
        assert values and all(0.0 <= v <= 1.0 for v in values.values()), values
        assert r["seconds"]["finetune"] > 0 and r["seconds"]["evaluate"] > 0
        assert isinstance(r["device"], str) and r["device"] and r["threads"] >= 1
        assert r["commit"] and r["date"].endswith("UTC") and r["torch"]
    none, mlm = records
    assert "probes" not in none["metrics"] and none["seconds"]["pretrain"] == 0.0
    assert mlm["seconds"]["pretrain"] > 0
    assert {"itm_captions", "edit_all", "shape_word", "place_word"} <= set(mlm["metrics"]["probes"])


def test_the_script_trains_what_no_committed_checkpoint_holds(recorded):
    # No smoke model is ever committed, so the script's default search finds none.
    for line in recorded["lines"]:
        assert json.loads(line)["reused"] == {"pretrain": None, "finetune": None}


# ---------------------------------------------------------------------------
# Reusing a stored model whose spec is the run's
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_data(book):
    data = pretrain.pretrain_data("uniter", book, "smoke", "cpu")
    return data, pretrain.question_data("uniter", book, data, "smoke", "cpu")


def store(model, spec, name, root, seconds):
    return checkpoints.save_checkpoint(
        model,
        name=name,
        chapter="elsewhere",
        recipe="smoke",
        spec=spec,
        steps=1,
        batch_size=1,
        device="cpu",
        wall_seconds=seconds,
        root=root,
    )


def test_find_by_spec_finds_a_model_of_any_name_by_its_spec(book, tmp_path):
    spec = ablation.ablation_spec("none", 0, book, "smoke")["vqa"]
    torch.manual_seed(0)
    store(pretrain.vqa_model("uniter", book, "smoke"), spec, "b/second", tmp_path, 2.0)
    store(pretrain.vqa_model("uniter", book, "smoke"), spec, "a/first", tmp_path, 1.0)
    record, root = checkpoints.find_by_spec(spec, (str(tmp_path),))
    assert (record.name, root) == ("a/first", str(tmp_path))  # of two, the first name
    other = ablation.ablation_spec("none", 1, book, "smoke")["vqa"]
    assert checkpoints.find_by_spec(other, (str(tmp_path),)) is None
    assert checkpoints.find_by_spec(spec, ()) is None


def test_a_stored_fine_tuned_model_is_loaded_not_trained(book, smoke_data, tmp_path):
    data, questions = smoke_data
    spec = ablation.ablation_spec("none", 0, book, "smoke")["vqa"]
    torch.manual_seed(5)  # weights that fine-tuning would never give: the record must be theirs
    store(pretrain.vqa_model("uniter", book, "smoke"), spec, "elsewhere/vqa", tmp_path, 123.0)
    run = partial(ablation.run_ablation, "none", 0, book, data, questions, "smoke", "cpu", False)
    record = run(reuse_from=(str(tmp_path),))
    assert record["reused"] == {"pretrain": None, "finetune": "elsewhere/vqa"}
    assert record["seconds"]["finetune"] == 123.0
    stored, _, _ = checkpoints.load_checkpoint("elsewhere/vqa", str(tmp_path))
    scores = pretrain.evaluate_vqa_model(stored, questions)
    assert record["metrics"]["vqa"] == {k: scores[k] for k in ablation.VQA_KEYS}
    trained = run(reuse_from=())
    assert trained["reused"] == {"pretrain": None, "finetune": None}
    assert trained["seconds"]["finetune"] != 123.0


def test_a_stored_pretrained_model_is_fine_tuned_not_pretrained_again(book, smoke_data, tmp_path):
    data, questions = smoke_data
    spec = ablation.ablation_spec("MLM", 0, book, "smoke")["pretrain"]
    torch.manual_seed(5)
    fresh = uniter.UniterForPretraining(pretrain.pretrain_config("uniter", book, "smoke"))
    store(fresh, spec, "elsewhere/pretrained", tmp_path, 456.0)
    record = ablation.run_ablation(
        "MLM", 0, book, data, questions, "smoke", "cpu", False, reuse_from=(str(tmp_path),)
    )
    assert record["reused"] == {"pretrain": "elsewhere/pretrained", "finetune": None}
    assert record["seconds"]["pretrain"] == 456.0 and record["seconds"]["finetune"] > 0
    stored, _, _ = checkpoints.load_checkpoint("elsewhere/pretrained", str(tmp_path))
    probes = pretrain.grounding_metrics(stored, data, "test", prefix="")
    assert record["metrics"]["probes"] == probes  # scored on the stored weights


def test_a_second_invocation_skips_what_is_recorded(recorded, capsys, script):
    # The module fixture's second call appended nothing; here its message, cheaply: only skips.
    argv = ["--recipe", "smoke", "--rows", "MLM", "none", "--seeds", "0"]
    argv += ["--out", str(recorded["out"]), "--work", str(recorded["root"] / "work")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSIONLIB_PROFILE", "smoke")
        assert script.main(argv + ["--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2 and "running" not in printed
    assert len(recorded["out"].read_text().splitlines()) == 2


def test_current_records_keep_what_todays_code_would_reproduce(recorded, book, tmp_path):
    records = ablation.read_records(recorded["out"])
    stale = dict(records[1], fingerprint="0" * 16)
    other = dict(records[0], recipe="small")
    later = dict(records[0], metrics={"vqa": {"accuracy": 0.25}})
    kept = ablation.current_records([stale, records[1], other, records[0], later], book, "smoke")
    assert [(r["row"], r["seed"]) for r in kept] == [("none", 0), ("MLM", 0)]
    assert kept[0]["metrics"] == {"vqa": {"accuracy": 0.25}}  # the later of two records
    summary = ablation.summarise(ablation.current_records(records, book, "smoke"))
    assert list(summary) == ["none", "MLM"]
    effect = ablation.row_effects(summary)["MLM"]["metrics"]["vqa.accuracy"]
    assert effect["exceeds_spread"] is None  # one seed each
    bad = tmp_path / "bad.jsonl"
    bad.write_text(recorded["lines"][0] + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        ablation.read_records(bad)


def test_a_spent_budget_exits_3_and_records_nothing(script, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = ["--recipe", "smoke", "--rows", "MLM", "--seeds", "7", "--out", str(out)]
    argv += ["--work", str(tmp_path / "work"), "--budget", "0.001", "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSIONLIB_PROFILE", "smoke")
        assert script.main(argv) == script.BUDGET_SPENT
    assert not out.exists()


def test_smoke_records_go_to_the_cache_and_full_ones_to_results(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSIONLIB_CACHE", str(tmp_path))
    assert ablation.records_path("smoke") == str(tmp_path / "ablation" / "06b_ablation_smoke.jsonl")
    assert ablation.records_path("small").startswith(str(tmp_path))
    assert ablation.records_path("full") == os.path.join(REPO, "results", "06b_ablation.jsonl")


@pytest.mark.parametrize(
    "argv",
    [
        ["--recipe", "smoke", "--rows", "MLM+MRFR"],
        ["--recipe", "tiny"],
        ["--recipe", "smoke", "--seeds", "-1"],
        ["--recipe", "smoke", "--threads", "0"],
        ["--rows", "MLM"],  # the recipe is never guessed
    ],
)
def test_the_script_refuses_bad_arguments(script, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(argv)
    assert exit_.value.code == 2
