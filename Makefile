# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
# The simulated master gets its own venv: awscli 1.x pins an exact botocore version.
MASTER_VENV := .venv-master
PY := $(VENV)/bin/python
# checkov (tests/test_infra.py) pins old boto3 and packaging releases: a venv of its own too.
CHECKOV_VENV := .venv-checkov

.PHONY: setup demo test test-reliability test-real cluster-up cluster-down lint clean

setup: $(VENV)/.installed $(MASTER_VENV)/.installed
setup: $(CHECKOV_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(MASTER_VENV)/.installed: tests/requirements-master.txt
	$(PYTHON) -m venv $(MASTER_VENV)
	$(MASTER_VENV)/bin/pip install -q -r tests/requirements-master.txt
	touch $@

$(CHECKOV_VENV)/.installed: tests/requirements-checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q -r tests/requirements-checkov.txt
	touch $@

# The demo needs no lint or infra tools: only the action's venv and the simulated master's.
# devkit (the rig) is not installed: `-m` from the project root finds it.
demo: $(VENV)/.installed $(MASTER_VENV)/.installed
	$(PY) -m devkit demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
# The reliability suite (tests/reliability: faults, cancels, SSM outcomes, bad input, security)
# runs as a session of its own, in parallel: its end-to-end runs mostly wait (about 4 minutes
# with 4 workers on 2 CPUs). A whole run rewrites the figures of docs/RELIABILITY.md.
RELIABILITY_WORKERS ?= 4
# The main suite runs in 3 processes too: most of its tests wait on subprocesses (the script, the
# simulated master, moto's server, Docker), so 3 workers on 2 CPUs took 28 minutes where one
# took 41 (measured on a clean clone). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3
test: setup
	@rc=0; $(PY) -m pytest -n $(TEST_WORKERS) --ignore=tests/reliability --ignore=tests/real $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc
	$(MAKE) --no-print-directory test-reliability
	$(MAKE) --no-print-directory test-real

test-reliability: setup
	@rc=0; $(PY) -m pytest -n $(RELIABILITY_WORKERS) tests/reliability || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# The real-cluster tier (tests/real): the deploy script against a real Kubernetes API server
# built from upstream Go modules (tests/cluster/README.md). Needs Go 1.26+; the first build takes
# about 11 minutes on 2 cores and is cached, then the control plane starts in under 30 s. Its
# tests run one after the other on one shared control plane (the deploy lock is cluster-wide).
test-real: setup
	@rc=0; $(PY) -m pytest tests/real || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

cluster-up:
	@bash tests/cluster/up

cluster-down:
	@bash tests/cluster/down

# Lints the code and every example: shell scripts (the deploy script part by part, then joined
# as the master gets it; the terraform user-data template included:
# its ${...} are terraform's placeholders, see its shellcheck directive), YAML, workflows
# (actionlint, zizmor, schema) and the action metadata (schema). The IAM policies, the terraform
# and the manifests are checked by tests: tests/test_iam.py (parliament), tests/test_infra.py
# (checkov) and tests/test_examples.py (kubernetes-validate).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/shellcheck deploykit/scripts/k3s-deploy/*.sh .ci/run
	@joined=$$(mktemp -d) && trap 'rm -rf "$$joined"' EXIT && \
	$(PY) -c 'import sys; from deploykit import command; command.write_deploy_script(sys.argv[1])' "$$joined" && \
	$(VENV)/bin/shellcheck "$$joined/k3s-deploy.sh" && echo "shellcheck: joined deploy script clean"
	$(VENV)/bin/shellcheck .ci/*.sh
	$(VENV)/bin/shellcheck tests/cluster/build tests/cluster/up tests/cluster/down
	$(VENV)/bin/shellcheck --shell=bash examples/infra/terraform/k3s/*.sh.tftpl
	$(VENV)/bin/yamllint --strict examples $(wildcard .github)
	$(VENV)/bin/actionlint -shellcheck $(VENV)/bin/shellcheck examples/workflows/*.yaml $(wildcard .github/workflows/*.y*ml)
	$(VENV)/bin/zizmor --offline --no-progress --min-severity medium examples/workflows/*.yaml $(wildcard .github/workflows/*.y*ml)
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows examples/workflows/*.yaml $(wildcard .github/workflows/*.y*ml)
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-actions action.yml

clean:
	rm -rf $(VENV) $(MASTER_VENV)
	rm -rf $(CHECKOV_VENV)
