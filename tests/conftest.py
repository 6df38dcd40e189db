"""Test setup: Triton kernels run under the interpreter on machines without CUDA.

``TRITON_INTERPRET`` must be set before triton is imported, hence at the top here.
Tests marked ``gpu`` are skipped when no CUDA device is present.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import BackendSwitch  # noqa: E402

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores,
# so that workers do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def use_backend():
    """``use_backend(backend, device)``: the rest of the test runs on that kernel path."""
    switch = BackendSwitch()
    with switch.stack:
        yield switch
