"""Execute chapters in place, each in a fresh kernel: ``python scripts/execute_notebooks.py notebooks/*.ipynb``.

The profile comes from ``$FUSIONLIB_PROFILE`` (cpu by default without CUDA).
Each notebook runs with its own folder as the working directory, as Jupyter
would run it, and is saved even when a cell fails, so the error can be read.

Progress bars print many carriage-return updates; the saved notebook keeps
only what a terminal would finally show (``--tidy-only`` does just that to
notebooks executed elsewhere, e.g. on a GPU machine).

A chapter whose committed outputs come from a larger profile than this run's
(``profile=gpu`` in its first printed line, and this run is ``cpu``) is
skipped with a message: its outputs would be replaced by a weaker run's. Pass
``--force`` only once every model the chapter trains loads from a full-recipe
checkpoint, so the cpu run shows the same models.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parent.parent)
)  # fusionlib from this checkout


def final_text(text: str) -> str:
    """What a terminal finally shows: on each line, only what follows the last carriage return."""
    lines = text.split("\n")
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)


def tidy_streams(nb: nbformat.NotebookNode) -> None:
    """Merge consecutive stream outputs of each cell and collapse progress-bar updates."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged: list = []
        for out in cell.get("outputs", []):
            if (
                out.output_type == "stream"
                and merged
                and merged[-1].output_type == "stream"
                and merged[-1].name == out.name
            ):
                merged[-1].text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = final_text(out.text)
        cell.outputs = merged


def committed_profile(nb: nbformat.NotebookNode) -> str | None:
    """The profile a notebook was last executed with: ``profile=NAME`` in its first printed line."""
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            found = re.search(r"\bprofile=(\w+) \| device=", out.get("text", ""))
            if found:
                return found.group(1)
    return None


def weaker_run(nb: nbformat.NotebookNode, profile: str) -> str | None:
    """Why running ``nb`` with ``profile`` would replace its outputs with weaker ones, or None."""
    from fusionlib.runtime import PROFILE_RECIPE, recipe_rank

    committed = committed_profile(nb)
    if committed in PROFILE_RECIPE and profile in PROFILE_RECIPE:
        if recipe_rank(PROFILE_RECIPE[committed]) > recipe_rank(PROFILE_RECIPE[profile]):
            return (
                f"its committed outputs come from the {committed} profile, this run's is {profile}"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--kernel", default="python3")
    parser.add_argument(
        "--force",
        action="store_true",
        help="execute chapters whose committed outputs come from a larger profile too",
    )
    parser.add_argument(
        "--tidy-only", action="store_true", help="only collapse progress-bar outputs"
    )
    args = parser.parse_args(argv)
    if args.tidy_only:
        for path in args.notebooks:
            nb = nbformat.read(path, as_version=4)
            tidy_streams(nb)
            nbformat.write(nb, path)
        return 0
    if os.environ.get("FUSIONLIB_PROFILE") == "smoke":
        print(
            "warning: executing with the smoke profile; such outputs must not be committed",
            file=sys.stderr,
        )
    from fusionlib import runtime

    profile = runtime.profile()
    skipped = []
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        why = weaker_run(nb, profile)
        if why and not args.force:
            print(f"{path}: skipped: {why} (--force runs it anyway)", file=sys.stderr)
            skipped.append(path)
            continue
        # The kernel keeps no history file: a machine may give it no writable home.
        client = NotebookClient(
            nb,
            timeout=args.timeout,
            kernel_name=args.kernel,
            resources={"metadata": {"path": str(path.parent)}},
            extra_arguments=["--HistoryManager.hist_file=:memory:"],
        )
        start = time.perf_counter()
        try:
            client.execute()
        except CellExecutionError as error:
            tidy_streams(nb)
            nbformat.write(nb, path)
            print(
                f"{path}: FAILED after {time.perf_counter() - start:.0f} s\n{error}",
                file=sys.stderr,
            )
            return 1
        tidy_streams(nb)
        nbformat.write(nb, path)
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s")
    if skipped:
        print(f"{len(skipped)} chapter(s) skipped: {', '.join(map(str, skipped))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
