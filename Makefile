# The Fusion book: every target installs what it needs into .venv first.
#   make book     build the HTML book from the committed notebook outputs
#   make test     pytest on fusionlib + nbval on every chapter (smoke profile)
#   make lab      JupyterLab on the repository root (chapters in notebooks/, the course in assignments/)
#   make execute  re-execute every chapter in place with $FUSIONLIB_PROFILE (default: cpu, or gpu with CUDA);
#                 a chapter executed with a larger profile is skipped (ARGS=--force runs it)
#   make train-book  train every checkpoint the book uses: RECIPE=full (default) ARGS="--only ch03 --budget 3600"
#   make ablation  chapter 6b's ablation, every (row, seed) not yet in results/06b_ablation.jsonl: RECIPE=full (default) ARGS="--seeds 0 --budget 3600"
#   make assignments  nbgrader course in assignments/: the student versions of the chapters (release/)
#   make grade    autograde assignments/submitted/ with the smoke profile, then write the feedback

PYTHON ?= python3
# The environment every target installs into: .venv, or the conda env `fusion` when it is active
# (environment.yml supplies only Python and Node, so nothing is installed twice). VENV=DIR overrides.
VENV   := $(if $(filter fusion,$(CONDA_DEFAULT_ENV)),$(CONDA_PREFIX),.venv)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MATHJAX := book/_static/mathjax/tex-mml-chtml.js
MATHJAX_VERSION := 3.2.2
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

# make grade ASSIGNMENT=01_attention: one assignment (default: every one in assignments/source/)
ASSIGNMENT ?=
# nbgrader runs `alembic` from PATH, so the venv's bin comes first; it reads nbgrader_config.py here.
NBGRADER := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/nbgrader
RECIPE ?= full
ARGS ?=

.PHONY: train-book ablation format format-check assignments grade book test pytest nbval check-notebooks browser-check lab-check chromium lab execute mathjax clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[book,test,teach]"
	touch $(STAMP)

# MathJax 3 from the npm registry, served from _static so equations render offline.
$(MATHJAX):
	rm -rf book/_static/mathjax .cache/mathjax && mkdir -p .cache/mathjax
	cd .cache/mathjax && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null && tar xzf mathjax-$(MATHJAX_VERSION).tgz
	mkdir -p book/_static/mathjax && cp -r .cache/mathjax/package/es5/. book/_static/mathjax/
	test -f $(MATHJAX)

mathjax: $(MATHJAX)

book: $(STAMP) $(MATHJAX)
	$(PY) scripts/make_status_page.py
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "Open the book: file://$(CURDIR)/_build/html/index.html"

check-notebooks: $(STAMP)
	$(PY) scripts/check_notebooks.py

# One formatter for the library, tests, scripts and notebooks (ruff format, 100 columns: wider code
# cells scroll sideways on the book's pages). `make format` applies it.
FORMATTED := fusionlib tests scripts notebooks book/_ext
format-check: $(STAMP)
	$(VENV)/bin/ruff format --check $(FORMATTED)

format: $(STAMP)
	$(VENV)/bin/ruff format $(FORMATTED)

pytest: $(STAMP)
	FUSIONLIB_PROFILE=smoke $(PY) -m pytest tests -q

nbval: $(STAMP)
	FUSIONLIB_PROFILE=smoke MPLBACKEND=Agg $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
		--nbval-sanitize-with tests/notebooks/sanitize.cfg --nbval-cell-timeout=600 $(NOTEBOOKS)

# Debian's Chromium for the browser check; skipped with a message when it cannot be installed.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		( (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || \
		  echo "could not install chromium with apt-get: the browser check will be skipped" )

browser-check: book chromium
	$(PY) scripts/check_book_browser.py

# JupyterLab in headless Chromium: chapter 1's exercises render (jupyterlab-myst), titled, with typeset math.
lab-check: $(STAMP) chromium
	$(PY) scripts/check_lab_browser.py

test: check-notebooks format-check pytest nbval browser-check lab-check

# nbgrader generate_assignment on each chapter with graded cells: assignments/release/<chapter>/ for students.
assignments: $(STAMP)
	$(PY) scripts/make_assignments.py

# nbgrader autograde (smoke profile, from nbgrader_config.py), then generate_feedback: assignments/feedback/.
grade: $(STAMP)
	@test -d assignments/submitted || { echo "nothing in assignments/submitted/: see the README, Teaching with it"; exit 1; }
	@for a in $(or $(ASSIGNMENT),$(notdir $(wildcard assignments/source/*))); do \
		echo "== $$a"; \
		$(NBGRADER) autograde $$a && $(NBGRADER) generate_feedback $$a || exit 1; \
	done

# Lab refuses to run as root unless told: in a container (root) the target passes --allow-root.
LAB_FLAGS := $(if $(filter 0,$(shell id -u)),--allow-root)
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" $(LAB_FLAGS)

train-book: $(STAMP)
	$(PY) scripts/train_book.py --recipe $(RECIPE) $(ARGS)

ablation: $(STAMP)
	$(PY) scripts/ablation.py --recipe $(RECIPE) $(ARGS)

execute: $(STAMP)
	$(PY) scripts/execute_notebooks.py $(ARGS) $(NOTEBOOKS)

clean:
	rm -rf _build .cache/mathjax book/_static/mathjax
