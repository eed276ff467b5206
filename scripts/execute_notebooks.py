"""Execute chapters in place, each in a fresh kernel: ``python scripts/execute_notebooks.py notebooks/*.ipynb``.

The profile comes from ``$FUSIONLIB_PROFILE`` (cpu by default without CUDA).
Each notebook runs with its own folder as the working directory, as Jupyter
would run it, and is saved even when a cell fails, so the error can be read.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebooks", nargs="+", type=pathlib.Path)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)
    if os.environ.get("FUSIONLIB_PROFILE") == "smoke":
        print("warning: executing with the smoke profile; such outputs must not be committed", file=sys.stderr)
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=args.timeout, kernel_name=args.kernel,
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        try:
            client.execute()
        except CellExecutionError as error:
            nbformat.write(nb, path)
            print(f"{path}: FAILED after {time.perf_counter() - start:.0f} s\n{error}", file=sys.stderr)
            return 1
        nbformat.write(nb, path)
        print(f"{path}: executed in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
