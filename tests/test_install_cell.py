"""The notebooks' install cell (Colab, a fresh kernel): one pinned release, and its command works.

Every notebook's first code cell installs ``fusionlib`` at the release that
``fusionlib.__version__`` names, from the repository that ``_config.yml``
names, with the dependency versions of ``pyproject.toml``. The second test runs
that cell's ``%pip install`` command, offline, in a new virtual environment:
the git URL is swapped for ``fusionlib==<version>`` and ``--no-index
--find-links`` a wheel built from this tree. Like Colab, which comes with torch
and most of the rest installed, the new environment sees this environment's
packages, pip included, as already installed (all but ``fusionlib``), so pip
must find every pinned dependency satisfied or fail: it cannot download.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import course_cells  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PIP_LINE = re.compile(r"^\s*%pip install (?P<args>.+)$", re.MULTILINE)
# What the new environment does not take over from this one: the package under test (installed
# editable here).
NOT_PREINSTALLED = re.compile(r"^(fusionlib|__editable__)", re.IGNORECASE)


def install_source(path: pathlib.Path) -> str:
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return course_cells.source_of(code[0])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_installs_the_pinned_release_first(path):
    source = install_source(path)
    if "--no-deps" in source:
        pytest.skip(f"{path.name} has the old install cell: run scripts/course_cells.py on it")
    url, version = course_cells.release()
    assert source == course_cells.install_source(url, version), (
        f"run scripts/course_cells.py {path.relative_to(ROOT)}"
    )
    assert f"git+{url}@v{version}" in source and "--no-deps" not in source


def test_a_notebook_without_an_install_cell_gets_one_first_and_once():
    def code(source, count):
        out = {
            "output_type": "execute_result",
            "execution_count": count,
            "data": {},
            "metadata": {},
        }
        return {
            "cell_type": "code",
            "execution_count": count,
            "id": f"c{count}",
            "metadata": {},
            "outputs": [out],
            "source": [source],
        }

    title = {"cell_type": "markdown", "id": "t", "metadata": {}, "source": ["# FAQ"]}
    nb = {"cells": [title, code("1 + 1", 1), code("2 + 2", 2)], "metadata": {}}
    once = course_cells.install_cell(nb, "https://example.org/repo", "9.9")
    assert course_cells.install_cell(once, "https://example.org/repo", "9.9") == once
    install, first, second = once["cells"][1:]
    assert course_cells.source_of(install).startswith(course_cells.INSTALL_MARK)
    assert '%pip install -q "fusionlib @ git+https://example.org/repo@v9.9"' in (
        course_cells.source_of(install)
    )
    assert install["metadata"]["tags"] == ["remove-cell"] and install["execution_count"] == 1
    assert [first["execution_count"], first["outputs"][0]["execution_count"]] == [2, 2]
    assert second["execution_count"] == 3
    moved = course_cells.install_cell(once, "https://example.org/repo", "10.0")
    assert "@v10.0" in course_cells.source_of(moved["cells"][1]) and len(moved["cells"]) == 4


def pip_arguments() -> list[str]:
    """Chapter 1's ``%pip install`` arguments, pointed at a local wheel instead of the git tag."""
    url, version = course_cells.release()
    args = shlex.split(
        PIP_LINE.search(install_source(ROOT / "notebooks" / "01_attention.ipynb"))["args"]
    )
    requirement = f"fusionlib @ git+{url}@v{version}"
    assert requirement in args, f"the install cell should install {requirement!r}: {args}"
    return [f"fusionlib=={version}" if a == requirement else a for a in args]


def run(command: list, **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    assert result.returncode == 0, f"{shlex.join(map(str, command))}:\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_install_cell_installs_a_local_wheel_offline_in_a_clean_venv(tmp_path):
    url, version = course_cells.release()
    # A wheel from this tree, built in a copy so that nothing lands in the repository.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "fusionlib", src / "fusionlib", ignore=shutil.ignore_patterns("__pycache__")
    )
    wheels = tmp_path / "wheels"
    # No pip settings from this machine (an index, extra find-links) and nothing on PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", str(wheels), str(src)],
        env=env,
    )
    (wheel,) = wheels.glob("fusionlib-*.whl")
    assert wheel.name.startswith(f"fusionlib-{version}-")

    # A new venv that sees this environment's packages, except fusionlib, as preinstalled.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    python = venv / "bin" / "python"
    site = pathlib.Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env
        ).strip()
    )
    preinstalled = tmp_path / "preinstalled"
    preinstalled.mkdir()
    for entry in pathlib.Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not NOT_PREINSTALLED.match(entry.name):
            (preinstalled / entry.name).symlink_to(entry)
    (site / "zz_preinstalled.pth").write_text(
        f"import site; site.addsitedir({str(preinstalled)!r})\n", encoding="utf-8"
    )
    missing = run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('fusionlib'))"],
        env=env,
        cwd=tmp_path,
    )
    assert missing.strip() == "None"

    # The install cell's command, as %pip runs it (python -m pip install ...), with no index.
    command = [python, "-m", "pip", "install", *pip_arguments(), "--no-index"]
    command += ["--find-links", str(wheels)]
    run(command, env=env, cwd=tmp_path)
    shown = run(
        [
            python,
            "-c",
            "import fusionlib, fusionlib.exercises; print(fusionlib.__version__, fusionlib.__file__)",
        ],
        env=env,
        cwd=tmp_path,
    ).split()
    assert shown[0] == version
    assert pathlib.Path(shown[1]).is_relative_to(site), "fusionlib should come from the new venv"
    assert url.startswith("https://")
