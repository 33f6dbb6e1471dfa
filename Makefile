# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
# The simulated master gets its own venv: awscli 1.x pins an exact botocore version.
MASTER_VENV := .venv-master
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed $(MASTER_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(MASTER_VENV)/.installed: tests/requirements-master.txt
	$(PYTHON) -m venv $(MASTER_VENV)
	$(MASTER_VENV)/bin/pip install -q -r tests/requirements-master.txt
	touch $@

demo: setup
	$(PY) -m deploykit demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: setup
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck deploykit/scripts/*.sh .ci/run

clean:
	rm -rf $(VENV) $(MASTER_VENV)
