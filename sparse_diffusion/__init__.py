"""Sparse-to-sparse training of diffusion models on top of :mod:`sparse_kernels`.

    import sparse_diffusion as sd
    report = sd.sparsify(unet, sparsity=0.75, block_size=32, distribution="erk")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    algo = sd.RigL(unet, optimizer, total_steps=T, update_interval=100, drop_fraction=0.3)
    for batch in data:
        loss(unet, batch).backward(); optimizer.step(); optimizer.zero_grad(); algo.step()
"""
from .algorithms import DynamicSparsity, MagRan, RigL, Static, assert_masks_synced, mask_fingerprint
from .sparsify import LayerReport, SparsityReport, layer_densities, sparsify

__all__ = [
    "DynamicSparsity",
    "LayerReport",
    "MagRan",
    "RigL",
    "SparsityReport",
    "Static",
    "assert_masks_synced",
    "layer_densities",
    "mask_fingerprint",
    "sparsify",
]
