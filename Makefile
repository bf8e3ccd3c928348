# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv, install torch 2.13.0 there if it has no torch, then this project.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.suanli-installed
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/suanli doctor
	$(VENV)/bin/suanli train examples/demo.toml --launcher ray --workers 2 --run-dir runs/demo-$$(date +%Y%m%d-%H%M%S) \
		--inject-fault kill:rank=1:step=12 --inject-fault hang:rank=0:step=22

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
