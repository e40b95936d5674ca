# mink-ssl: two commands on a fresh machine, `make demo` and `make test` (both set up first).
# Variables for `make setup` (TORCH_SPEC, TORCH_INDEX_URL, ME_CUDA, TORCH_CUDA_ARCH_LIST,
# MINK_SSL_CACHE) are documented in scripts/setup.sh and the README.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mink-ssl-setup
export VENV

.PHONY: setup test test-fast demo bench clean gpu-wheels gpu-check

# Always runs the (idempotent) setup script; a second run takes seconds.
setup:
	bash scripts/setup.sh
	@touch $(STAMP)

# Set up only when the venv is missing or the setup inputs changed.
$(STAMP): setup.py scripts/setup.sh scripts/build_minkowski.py
	bash scripts/setup.sh
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# everything but the end-to-end runs marked slow (a quick check while editing)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# one OpenMP thread unless set: MinkowskiEngine's CPU kernels ran 2.3x slower with 2 threads on 2 cores
demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m mink_ssl.cli.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_backbone.py
	$(PY) benchmarks/bench_storage.py
	$(PY) benchmarks/bench_overlap.py
	$(PY) benchmarks/bench_pretrain_step.py
	$(PY) benchmarks/bench_objectives.py

# GPU check (scripts/gpu_check.py): `make gpu-wheels` on a networked machine with the venv
# prepares build/gpu-check (real fragments, ME sdist, wheels incl. spconv-triton; < 64 MiB);
# `make gpu-check` on the GPU machine (CUDA torch, nvcc, no network) builds ME for its GPU and
# checks and times the CUDA path on both engines, and the engines against each other.
# GPU_CHECK_PYTHON: the interpreter holding the CUDA torch (default python3); GPU_CHECK_ME=no
# skips ME (its CUDA build outlasts a device call): spconv only, the comparisons skipped.
gpu-wheels: $(STAMP)
	$(PY) scripts/gpu_check.py prepare

gpu-check:
	PYTHONUNBUFFERED=1 $${GPU_CHECK_PYTHON:-python3} scripts/gpu_check.py run

clean:
	rm -rf build *.egg-info .pytest_cache
