"""Sparse-to-sparse training of diffusion models on top of :mod:`sparse_kernels`.

In order: ``sd.sparsify(model, sparsity, block_size=...)`` makes the model block-sparse in
place; then create the optimizer and the EMA (they must hold the new parameters); then
``algo = sd.RigL(model, optimizer, total_steps=..., ema=ema)`` (or ``sd.MagRan``,
``sd.Static``), and call ``algo.step()`` after each ``optimizer.step()``, before the
gradients are cleared. ``sd.save_pretrained`` / ``sd.load_pretrained`` keep a model sparse on
disk; ``sd.densify`` turns it back into a plain diffusers model; ``sd.export_run`` writes a
trained run (opened with ``sparse_diffusion.run.load_run``) as a diffusers folder. README.md's
library section is a complete, tested example.
"""
from importlib.util import find_spec

# The training layer needs what the `diffusion` extra installs (sparse_kernels alone does not).
DEPENDENCIES = {"diffusers": "diffusers", "safetensors": "safetensors", "tqdm": "tqdm", "yaml": "pyyaml",
                "PIL": "pillow", "matplotlib": "matplotlib"}
_missing = [package for module, package in DEPENDENCIES.items() if find_spec(module) is None]
if _missing:
    raise ImportError(f"sparse_diffusion needs {', '.join(_missing)}: install the training layer with "
                      "`pip install --no-build-isolation \"sparse-diffusion[diffusion]\"` (sparse_kernels alone works without)")

from .algorithms import DynamicSparsity, MagRan, RigL, Static, assert_masks_synced, mask_fingerprint  # noqa: E402
from .allocator import keep_freed_memory  # noqa: E402
from .channels_last import channels_last  # noqa: E402
from .export import export_run, load_pretrained, save_pretrained  # noqa: E402
from .sparsify import LayerReport, SparsityReport, densify, layer_densities, sparsify  # noqa: E402

__all__ = [
    "DynamicSparsity",
    "LayerReport",
    "MagRan",
    "RigL",
    "SparsityReport",
    "Static",
    "assert_masks_synced",
    "channels_last",
    "densify",
    "export_run",
    "keep_freed_memory",
    "layer_densities",
    "load_pretrained",
    "mask_fingerprint",
    "save_pretrained",
    "sparsify",
]
