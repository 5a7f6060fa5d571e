# vlm_lab: one command to set up and run each job. `make test` is the test command CI runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
PYTHON ?= python3
NB     ?= 05
PARAMS ?= -p layers 4

# requirements.lock's header shows this command; pip-tools runs from a throw-away venv, never from .venv.
# `make lock` keeps the lock's pins and adds or drops what pyproject.toml changed; `make lock LOCK_ARGS=--upgrade`
# moves every pin to the newest release (torch stays at constraints.txt's 2.13.0).
PIP_TOOLS   ?= pip-tools==7.6.2
LOCK_ARGS   ?=
PIP_COMPILE := pip-compile --allow-unsafe --build-deps-for=editable --constraint=constraints.txt --extra=dev \
  --generate-hashes --no-emit-find-links --no-emit-index-url --output-file=requirements.lock --strip-extras \
  pyproject.toml

.PHONY: setup lock test nbtest pytest stability reproduce publish run bench lab export clean
setup: $(VENV)/.installed

# The lock's exact versions, hash-checked (torch is the 2.13.0 CPU build), then the package itself without
# dependencies, built by the lock's setuptools (no isolated build environment to download).
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

lock:                                ## regenerate requirements.lock from pyproject.toml (dev extra) and constraints.txt
	@tmp=$$(mktemp -d) && $(PYTHON) -m venv $$tmp && $$tmp/bin/pip install -q $(PIP_TOOLS) && \
	  $$tmp/bin/$(PIP_COMPILE) --quiet $(LOCK_ARGS); status=$$?; rm -rf $$tmp; exit $$status

test: setup nbtest pytest            ## nbdev_test over every notebook, then pytest over tests/

# The notebooks' results and figures go to a throw-away root (never the user's results/ or tracked files); the
# feature cache stays in .cache/ so it is built once.
nbtest: setup
	@root=$$(mktemp -d) && VLM_LAB_ROOT=$$root VLM_LAB_CACHE=$(CURDIR)/.cache $(BIN)/nbdev_test --n_workers 1; \
	  status=$$?; rm -rf $$root; exit $$status

pytest: setup
	$(PY) -m pytest -q tests -m "not slow"

stability: setup                     ## each finding's quick verdicts rerun with other seeds and rounding (~25 min)
	$(PY) -m pytest -q -s tests/test_stability.py -m slow

reproduce: setup                     ## the main job: every finding's quick sweep and the ledger (make reproduce REPRO="--only 05")
	$(BIN)/vlm_lab reproduce $(REPRO)

publish: setup                       ## rerun every notebook's canonical run; commit-ready outputs, figures, ledger
	$(BIN)/vlm_lab reproduce --publish $(REPRO)

run: setup                           ## one notebook, parameters checked first: make run NB=05 PARAMS="-p layers 6"
	$(BIN)/vlm_lab run $(NB) $(PARAMS)

bench: setup                         ## the benchmarks of 11_performance: make bench BENCH="--profile full --only block"
	$(BIN)/vlm_lab bench $(BENCH)

# nbdev's pre-save hook cleans every save to the committed form (kernelspec, tags), so reading a notebook in
# JupyterLab leaves git status clean
lab: setup                           ## open the notebooks in JupyterLab
	cd nbs && $(CURDIR)/$(BIN)/jupyter lab --ContentsManager.pre_save_hook=nbdev.clean.clean_jupyter

export: setup                        ## regenerate vlm_lab/ from nbs/ after editing a notebook
	$(BIN)/nbdev_export

clean:
	rm -rf runs results .cache nbs/.cache
