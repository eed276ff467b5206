"""scripts/execute_notebooks.py: a chapter executed on a larger profile is not replaced by a weaker run."""

import os
import sys

import nbformat
import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
)
import execute_notebooks  # noqa: E402


def chapter(profile: str | None) -> nbformat.NotebookNode:
    """A two-cell notebook whose second cell printed the summary line of ``profile``."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A chapter"),
        nbformat.v4.new_code_cell("print(1 + 1)"),
    ]
    if profile is not None:
        line = f"profile={profile} | device=cpu (2 CPU threads) | python 3.11 | torch 2 | fusionlib 0.1.0\n"
        nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text=line)]
    return nb


def test_the_committed_profile_is_read_from_the_printed_summary():
    assert execute_notebooks.committed_profile(chapter("gpu")) == "gpu"
    assert execute_notebooks.committed_profile(chapter(None)) is None


@pytest.mark.parametrize(
    ("committed", "now", "weaker"),
    [
        ("gpu", "cpu", True),
        ("gpu", "smoke", True),
        ("cpu", "smoke", True),
        ("cpu", "cpu", False),
        ("cpu", "gpu", False),
        (None, "cpu", False),
    ],
)
def test_only_a_smaller_profile_is_a_weaker_run(committed, now, weaker):
    why = execute_notebooks.weaker_run(chapter(committed), now)
    assert (why is not None) == weaker
    if weaker:
        assert f"the {committed} profile" in why and f"this run's is {now}" in why


def test_a_gpu_chapter_is_skipped_on_cpu_and_runs_with_force(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUSIONLIB_PROFILE", "cpu")
    path = tmp_path / "09_gpu_chapter.ipynb"
    nbformat.write(chapter("gpu"), path)
    before = path.read_text()
    assert execute_notebooks.main([str(path)]) == 0
    assert path.read_text() == before  # untouched
    assert "skipped: its committed outputs come from the gpu profile" in capsys.readouterr().err
    assert execute_notebooks.main([str(path), "--force", "--timeout", "120"]) == 0
    outputs = nbformat.read(path, as_version=4).cells[1].outputs
    assert outputs[0].text == "2\n"  # executed: its outputs are this run's
