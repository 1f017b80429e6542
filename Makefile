# amptpl: `make demo` renders and trains a demo project, `make test` runs every test.
# Both create their own virtual environment in .venv (override with VENV=...).

VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= build/demo
# Offline by default: nothing downloads at run time.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.DEFAULT_GOAL := help
.PHONY: help venv install demo test test-fast lint bench docs docs-serve panel release-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.deps: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# the local CPU build of PyTorch when this machine has it; otherwise pip picks one for the platform
	$(PY) -m pip install -q torch==2.13.0 || echo "torch==2.13.0 not available: installing torch from pyproject's range"
	@# .[dev] = amptpl's tools + amptpl[train] (the generated project's stack: its tests train projects end to end)
	$(PY) -m pip install -q ".[dev]"
	touch $@

venv: $(VENV)/.deps ## create .venv with amptpl's dependencies

install: venv ## (re)install amptpl from this checkout as a real wheel
	$(PY) -m pip install -q --no-deps --force-reinstall .

demo: install ## render build/demo and train it: fp16 with a real loss scale (8-61 s of training on 2 CPU cores)
	@echo "make demo: the fp16 training took 8 s on a 2-core Intel Xeon with AVX512-FP16 and 61 s on a 2-core AMD EPYC without it; it prints its own time at the end"
	$(VENV)/bin/amptpl new $(notdir $(DEMO)) --dir $(dir $(DEMO)) --force
	@# configs/demo.yaml: fp16 with a CPU GradScaler on a small model, starting at a scale that overflows, so the
	@# loss-scale panel, skipped steps, the recovery and the AMP summary show on every machine
	@# resume=none: every `make demo` trains afresh; an earlier demo run moves to runs/demo/previous-runs/
	$(VENV)/bin/amptpl run $(DEMO) --config=configs/demo.yaml resume=none

test: install ## run every test: amptpl's own and, end to end, a generated project's
	@echo "make test: every test, CPU only and offline: 13-15 min on a 2-core Intel Xeon (slower where fp16 has no fast CPU kernels); pytest prints its own time at the end"
	$(PY) -m pytest -q -rs --durations=40 -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: install ## the quick tier only (no slow end-to-end runs)
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

docs: venv ## build the docs site into build/site, strictly: a broken link, anchor or page fails
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

panel: venv ## redraw docs/panel.svg (the README's picture) from a real demo run
	$(PY) scripts/panel_svg.py

docs-serve: venv ## preview the docs at http://127.0.0.1:8000, rebuilt on every edit
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

lint: venv ## ruff on the CLI, the template and the tests
	$(VENV)/bin/ruff check cli template tests benchmarks scripts

bench: install ## side-by-side benchmarks, quick sizes (ratios, printed; about 10 minutes on 2 CPU cores)
	@echo "make bench: three benchmarks, about 10 minutes on a 2-core Intel Xeon; each prints its own times"
	$(PY) benchmarks/overhead.py --quick
	$(PY) benchmarks/precision.py --quick
	$(PY) benchmarks/cli.py
	$(PY) benchmarks/eval.py --quick

# What a release builds and checks before it uploads (.github/workflows/release.yml; CI runs it on every push). It
# downloads build, twine and amptpl's dependencies into venvs of its own under RELEASE: not part of `make test`.
RELEASE ?= build/release
release-check: ## build the sdist and wheel into dist/, twine-check them, scaffold with the wheel in a clean venv
	rm -rf dist $(RELEASE)
	python3 -m venv $(RELEASE)/tools
	$(RELEASE)/tools/bin/pip install -q build twine
	$(RELEASE)/tools/bin/python -m build --outdir dist .
	$(RELEASE)/tools/bin/twine check --strict dist/*
	python3 -m venv $(RELEASE)/clean
	$(RELEASE)/clean/bin/pip install -q dist/*.whl
	@version=$$(sed -n 's/^__version__ = "\([^"]*\)".*/\1/p' cli/amptpl/__init__.py); \
	  got=$$($(RELEASE)/clean/bin/amptpl --version); \
	  if [ "$$got" != "amptpl $$version" ]; then \
	    echo "the wheel says '$$got', cli/amptpl/__init__.py says __version__ = $$version" >&2; exit 1; fi; \
	  echo "$$got"
	$(RELEASE)/clean/bin/amptpl --help >/dev/null
	$(RELEASE)/clean/bin/amptpl new smoke --dir $(RELEASE)
	test -f $(RELEASE)/smoke/src/smoke/train.py
	ls dist

clean: ## remove the venv and build outputs
	rm -rf $(VENV) build dist runs
