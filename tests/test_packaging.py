"""One distribution, two layers: `pip install .` is the kernels (torch, triton, numpy), the
`diffusion` extra adds the training layer; one version string."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import sparse_kernels

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_names(requirements):
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


def test_the_kernels_install_needs_torch_triton_and_numpy_only():
    assert requirement_names(PROJECT["dependencies"]) == {"torch", "triton", "numpy"}


def test_the_diffusion_extra_holds_what_the_training_layer_checks_for():
    source = (ROOT / "sparse_diffusion" / "__init__.py").read_text()
    checked = set(re.findall(r'"\w+": "([\w-]+)"', source.split("DEPENDENCIES = ", 1)[1].split("}", 1)[0]))
    assert checked and checked <= requirement_names(PROJECT["optional-dependencies"]["diffusion"])
    assert 'pip install -q --no-build-isolation -e ".[diffusion,dev]"' in (ROOT / "Makefile").read_text()


def test_one_version_string():
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', (ROOT / "sparse_kernels" / "__init__.py").read_text(), re.M)
    from importlib.metadata import version

    assert version("sparse-diffusion") == sparse_kernels.__version__


def test_without_the_diffusion_extra_the_training_layer_says_what_to_install():
    """sparse_kernels alone imports; sparse_diffusion names the extra, in one line."""
    code = "import sys; sys.modules['diffusers'] = None; import sparse_kernels; import sparse_diffusion"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: sparse_diffusion needs diffusers") and "sparse-diffusion[diffusion]" in last


def test_every_public_name_is_there():
    import sparse_diffusion

    for package in (sparse_kernels, sparse_diffusion):
        missing = [name for name in package.__all__ if not hasattr(package, name)]
        assert missing == [], f"{package.__name__}.__all__ names what it lacks: {missing}"
