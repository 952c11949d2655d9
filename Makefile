# `make test` and `make demo` do all the set-up on a fresh machine, then run.
# TORCH is the pip requirement for PyTorch; override it for your platform, e.g.
#   make test TORCH="torch==2.5.1"  or  make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hesse-installed

.PHONY: test demo lint bench bench-deps bench-quick gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Torch first (so that no other package makes pip resolve a different torch), then hesse.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/hesse demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

# Peers for side-by-side benchmarks. curvlinops and backpack declare torchvision, which
# would drag in another torch: install them without dependencies and add what they import.
bench-deps: $(STAMP)
	$(PY) -m pip install --quiet tqdm einops opt-einsum packaging
	$(PY) -m pip install --quiet --no-deps pyhessian==0.1 curvlinops-for-pytorch==3.0.1 \
		backpack-for-pytorch==1.7.1 hessian-eigenthings==1.0.0a5 pytorch-minimize==0.1.0 \
		unfoldNd==0.2.3 einconv==0.1.0 linear_operator==0.6.1

bench: bench-deps
	OMP_NUM_THREADS=2 $(PY) benchmarks/hvp_cost.py

# Every benchmark in its --quick mode: a check that the scripts run (about 20 minutes on 2
# cores), not figures to quote. They write benchmarks/results/*_quick*, which git ignores.
# The method and the full commands: benchmarks/README.md.
BENCH_ENV := OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1
bench-quick: bench-deps
	for b in hvp_cost transformer_hvp memory_budget eigen distributed minimize logistic \
			train kfac kfac_train prune dense_curvature; do \
		$(BENCH_ENV) $(PY) benchmarks/$$b.py --quick || exit 1; done

# On a machine with a CUDA GPU and a CUDA build of torch (GPU_PY): the CUDA tests (fused
# attention and cuDNN RNN kernels, products on the device, bf16, the nccl backend of
# hesse.distributed), then the GPU benchmarks: a transformer's Hessian-vector product, the
# HVP cost of the foundation's MLP and CNN, and the memory budget against PyHessian (the
# last needs the bench extra's peers; without them it fails alone and the rest still runs).
# Figures go to benchmarks/results/*_cuda.json.
GPU_PY ?= python3
gpu-check:
	PYTHONPATH=src $(GPU_PY) -m pytest -q -p no:cacheprovider -k "cuda" tests
	PYTHONPATH=src $(GPU_PY) benchmarks/transformer_hvp.py --device cuda
	PYTHONPATH=src $(GPU_PY) benchmarks/hvp_cost.py --device cuda --quick
	-PYTHONPATH=src $(GPU_PY) benchmarks/memory_budget.py --device cuda --quick

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
