# The two commands of the README:
#   make demo   sets up and runs the main job (a local cluster, a rank killed and recovered)
#   make test   sets up and runs the default test suite (what CI runs)
.PHONY: setup test test-gpu gpu-install demo lint
PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -m "not gpu and not multigpu and not multihost" $(PYTEST_ARGS)

# on a GPU machine (its own torch; no venv): the packages of requirements/cuda13.txt first
# (offline: `source .gpu-bundle/setup.sh`, a bundle of those pins; see README.md)
test-gpu: gpu-install
	python3 -m pytest -m "gpu or multigpu" $(PYTEST_ARGS)

# this checkout installed editable into the GPU machine's python3 (skipped when eep.membership
# already resolves into this checkout): what makes eep.membership, eep.transfer, ... importable
gpu-install:
	@python3 -c 'import os, eep.membership as m; r = os.path.realpath; raise SystemExit(not r(m.__file__).startswith(r(os.curdir) + os.sep))' 2>/dev/null \
		|| python3 -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

demo: setup
	.venv/bin/eep demo
