# Two commands matter: `make demo` (the whole pipeline on embedded defaults) and `make test`.
# Both create or reuse the virtual environment in $(VENV) and install what they need.
# GPU machines: install your own torch build into the venv first (or set TORCH_SPEC); an
# existing torch is kept. Here the default takes the local CPU wheel torch==2.13.0.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# the 30 slowest phases are listed at the end of every run (where the suite's time goes)
PYTEST_ARGS ?= --durations=30
# test files run on this many worker processes (pytest-xdist; one file per worker at a time, so a file's
# module fixtures are built once; the Ray-heavy files in a row on one worker: tests/conftest.py); 0 = serially
TEST_WORKERS ?= 2

.PHONY: venv demo test test-fast bench bench-pythae bench-sdv clean image stack-up stack-down

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/vaepipe demo --workdir demo

test: venv
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow" $(PYTEST_ARGS)

bench: venv
	$(PY) -m benchmarks.train_throughput
	$(PY) -m benchmarks.generate_throughput

# vaepipe's vae against pythae's VAE (held-out NLL, mnist5k); pythae lives in its own throwaway venv
PYTHAE_VENV ?= .bench-venvs/pythae
bench-pythae: venv
	test -x $(PYTHAE_VENV)/bin/python || { python3 -m venv $(PYTHAE_VENV) && $(PYTHAE_VENV)/bin/pip install -q "$(TORCH_SPEC)" pythae==0.1.2; }
	$(PY) -m benchmarks.vae_vs_pythae --pythae-python $(PYTHAE_VENV)/bin/python

# vaepipe's tvae vs SDV's TVAESynthesizer on the same tables (issue 15); SDV lives in its own throwaway venv
SDV_VENV ?= .bench-venvs/sdv
bench-sdv: venv
	test -x $(SDV_VENV)/bin/python || { python3 -m venv $(SDV_VENV) && $(SDV_VENV)/bin/pip install -q "$(TORCH_SPEC)" sdv==2.0.0 pyarrow; }
	$(PY) -m benchmarks.tables_vs_sdv --sdv-python $(SDV_VENV)/bin/python

# the deployment image, named by the `# Image:` line of infra/docker/Dockerfile
image:
	docker build -f infra/docker/Dockerfile -t $$(sed -n 's/^# Image: //p' infra/docker/Dockerfile) .

# a Ray head, a second Ray node and an MLflow server on this machine (infra/local/)
stack-up: venv
	infra/local/start-stack.sh

stack-down:
	infra/local/stop-stack.sh

clean:
	rm -rf demo .pytest_cache
