"""Model surgery: swap a model's ``nn.Linear`` / ``nn.Conv2d`` for block-sparse modules.

:func:`sparsify` picks each layer's density (uniform, ER or ERK, as RigL defines them),
chooses its live blocks (at random, or the largest blocks of the current weights), and
replaces the layer in place. A layer whose density comes out at 1.0 (ERK gives that to small
layers) keeps its plain dense module: the block-sparse kernels would only cost time there.
It returns a :class:`SparsityReport`. :func:`densify` is the way back: plain ``nn.Linear`` /
``nn.Conv2d`` layers holding the same weights, zeros at the dead blocks.

A sparsified diffusers model refuses diffusers' own ``save_pretrained``: diffusers would save
the block-sparse layers under names its ``from_pretrained`` does not know, and load them back
as freshly initialised (NaN) weights. :func:`densify` lifts the refusal;
:func:`sparse_diffusion.save_pretrained` keeps the model sparse on disk.
"""
from __future__ import annotations

import fnmatch
import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import sparse_kernels as sk

DISTRIBUTIONS = ("uniform", "er", "erk")
INITS = ("random", "magnitude")
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
# The densities from which a block-sparse layer runs dense kernels on its masked weight
# (BlockSparseModule.masked_dense): measured layer by layer with benchmarks/layers.py on the
# demo and small UNets (benchmarks/results/layers-*.json). At stride 1 the block-sparse kernels
# cost about what oneDNN costs on the masked weight at density 0.8 to 0.85, less below. A
# strided convolution (square blocks; its grad-input computed phase by phase) costs 1.04 of it
# at density 0.75 and 0.78 at 0.64, forward and backward together
# (layers-2026-12-06-Intel-R-Xeon-R-Processor-2-threads-strided-phases.json). Vector blocks
# (bo x 1) cost more per live weight than square ones (each input value feeds one output block,
# not two): over the layers of both UNets, ours / masked dense is 0.82 at density 0.45-0.55 and
# 1.08 at 0.55-0.65, strided ones included (layers-2026-12-06-Intel-R-Xeon-R-Processor-2-threads.json).
MASKED_DENSE_FROM = 0.8
MASKED_DENSE_FROM_STRIDED = 0.75
MASKED_DENSE_FROM_VECTOR = 0.6


# --------------------------------------------------------------------------- densities
def layer_densities(shapes: Sequence[Tuple[int, ...]], sparsity: float, distribution: str = "erk") -> List[float]:
    """Per-layer densities whose weighted mean is ``1 - sparsity``.

    Args:
        shapes: weight shapes ``[out, in, *taps]``.
        distribution: ``uniform`` (every layer ``1 - sparsity``); ``er`` (density
            proportional to ``(out + in) / (out * in)``); ``erk`` (proportional to
            ``sum(shape) / prod(shape)``, RigL's Erdos-Renyi-Kernel). ER and ERK cap
            densities at 1: the layer with the highest density is made dense and the
            budget is spread again over the others, until none exceeds 1 (as RigL does).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    density = 1.0 - sparsity
    if distribution == "uniform":
        return [density] * len(shapes)
    sizes = [math.prod(shape) for shape in shapes]
    if distribution == "erk":
        raw = [sum(shape) / math.prod(shape) for shape in shapes]
    else:
        raw = [(shape[0] + shape[1]) / (shape[0] * shape[1]) for shape in shapes]
    dense: set = set()
    while True:
        sparse = [i for i in range(len(shapes)) if i not in dense]
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        scale = budget / sum(raw[i] * sizes[i] for i in sparse) if sparse else 0.0
        highest = max(sparse, key=lambda i: raw[i], default=None)
        if highest is None or scale * raw[highest] <= 1.0:
            break
        dense.add(highest)
    return [1.0 if i in dense else max(scale * raw[i], 0.0) for i in range(len(shapes))]


# --------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """One weight layer of a sparsified model.

    ``macs_*`` count multiply-accumulates per output position (token or output pixel):
    multiply by the number of positions for the FLOPs (x2) of one forward. ``budgeted``
    layers share the sparsity budget (all but the ones kept dense by ``keep_dense`` or because
    the kernels cannot take them); ``path`` says what runs the layer and why.
    """

    name: str
    kind: str  # "Linear" or "Conv2d"
    shape: Tuple[int, ...]
    block: Optional[Tuple[int, int]]
    density: float
    live_blocks: int
    total_blocks: int
    path: str  # "compiled", "triton", "reference", "masked dense", "reference (masked, block 1)", "dense (density 1.0)" or "dense: <why>"
    params_dense: int
    params_sparse: int
    macs_dense: int
    macs_sparse: int
    budgeted: bool = True

    @property
    def sparse(self) -> bool:
        """Whether the layer runs block-sparse (not as a plain dense module)."""
        return not self.path.startswith("dense")


@dataclass
class SparsityReport:
    """What :func:`sparsify` did, layer by layer; ``str()`` is a readable table."""

    layers: List[LayerReport]
    sparsity: float
    distribution: str
    block_size: Tuple[int, int]

    @property
    def sparse_layers(self) -> List[LayerReport]:
        """The layers that run block-sparse."""
        return [layer for layer in self.layers if layer.sparse]

    @property
    def budgeted_layers(self) -> List[LayerReport]:
        """The layers that share the sparsity budget (the sparse ones and those at density 1.0)."""
        return [layer for layer in self.layers if layer.budgeted]

    @property
    def global_sparsity(self) -> float:
        """Fraction of weights removed over the budgeted layers."""
        dense = sum(layer.params_dense for layer in self.budgeted_layers)
        return 1.0 - sum(layer.params_sparse for layer in self.budgeted_layers) / dense if dense else 0.0

    def __str__(self) -> str:
        header = ("layer", "type", "weight", "block", "density", "live/total", "params", "MACs/pos", "path")
        rows = [header]
        for layer in self.layers:
            rows.append((
                layer.name, layer.kind, "x".join(map(str, layer.shape)),
                "x".join(map(str, layer.block)) if layer.block else "-",
                f"{layer.density:.3f}", f"{layer.live_blocks}/{layer.total_blocks}" if layer.block else "-",
                f"{layer.params_sparse:,}/{layer.params_dense:,}", f"{layer.macs_sparse:,}/{layer.macs_dense:,}",
                layer.path,
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        total_dense = sum(layer.params_dense for layer in self.layers)
        total_sparse = sum(layer.params_sparse for layer in self.layers)
        lines.append(
            f"{len(self.sparse_layers)}/{len(self.layers)} weight layers block-sparse, "
            f"{len(self.budgeted_layers) - len(self.sparse_layers)} at density 1.0 ({self.distribution}, block "
            f"{self.block_size[0]}x{self.block_size[1]}): sparsity {self.global_sparsity:.4f} over them "
            f"(asked {self.sparsity}); weight parameters {total_sparse:,}/{total_dense:,} in all"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- surgery
def _refusal(module: nn.Module, block: Tuple[int, int]) -> Optional[str]:
    """Why the block-sparse kernels cannot take ``module``, or ``None``."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode}"
    out_features, in_features = module.weight.shape[:2]
    if out_features % block[0] or in_features % block[1]:
        return f"{out_features}x{in_features} channels not divisible by block {block[0]}x{block[1]}"
    return None


def parent_module(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    """The module holding the submodule ``name`` of ``model``, and that submodule's attribute
    name in it (``setattr(parent, child, new)`` replaces it)."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def sparsify(
    model: nn.Module,
    sparsity: float,
    block_size: sk.BlockSize = 32,
    distribution: str = "erk",
    keep_dense: Optional[Sequence[str]] = None,
    init: str = "random",
    masked_dense: bool = True,
) -> SparsityReport:
    """Replaces ``model``'s ``nn.Linear`` / ``nn.Conv2d`` layers by block-sparse ones, in place.

    Args:
        model: any module; only layers of exactly these two types are replaced (a subclass
            may read ``.weight`` and is left alone).
        sparsity: fraction of weights removed over the sparsified layers, in [0, 1).
        block_size: ``b`` or ``(bo, bi)``; ``1`` is unstructured sparsity, run on the
            masked reference path (the report says so).
        distribution: ``uniform``, ``er`` or ``erk`` (see :func:`layer_densities`).
        keep_dense: module-name globs left dense; ``None`` keeps the first and the last
            weight layer dense (``[]`` keeps none).
        init: ``random`` draws the live blocks at random (sparse from scratch, torch's RNG);
            ``magnitude`` keeps the largest blocks of the current weights. Either way live
            values keep their current (dense) initialisation.
        masked_dense: let layers at high density (:data:`MASKED_DENSE_FROM`,
            :data:`MASKED_DENSE_FROM_STRIDED` for strided convolutions,
            :data:`MASKED_DENSE_FROM_VECTOR` for vector blocks) run dense kernels on
            their masked weight, where that was measured faster; ``False`` runs every sparse
            layer on the block-sparse kernels. A layer at density 1.0 always stays a plain
            dense module.
    Returns:
        A :class:`SparsityReport`. Create the optimizer after this call. A diffusers model
        (and each diffusers model inside ``model``) that now holds block-sparse layers refuses
        its ``save_pretrained`` with a ``ValueError`` until :func:`densify` (see the module's
        docstring).
    """
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    block = sk.normalize_block_size(block_size)
    weight_layers = [(name, m) for name, m in model.named_modules() if type(m) in WEIGHT_LAYERS]
    if not weight_layers:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to sparsify")
    if keep_dense is None:
        keep_dense = [weight_layers[0][0], weight_layers[-1][0]]

    reasons: Dict[str, str] = {}
    for name, module in weight_layers:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in keep_dense):
            reasons[name] = "dense: kept (keep_dense)"
        elif (why := _refusal(module, block)) is not None:
            reasons[name] = f"dense: {why}"
    chosen = [(name, m) for name, m in weight_layers if name not in reasons]
    if not chosen:
        raise ValueError(
            f"no layer can be sparsified with block size {block} (kept dense: "
            + "; ".join(f"{name}: {why[7:]}" for name, why in reasons.items()) + ")"
        )
    densities = dict(zip(
        (name for name, _ in chosen),
        layer_densities([tuple(m.weight.shape) for _, m in chosen], sparsity, distribution),
    ))

    layers = []
    for name, module in weight_layers:
        if name in reasons:
            layers.append(_dense_report(name, module, reasons[name], budgeted=False))
            continue
        grid = (module.weight.shape[0] // block[0], module.weight.shape[1] // block[1])
        if sk.blocks_for_density(min(densities[name], 1.0), grid[0] * grid[1]) == grid[0] * grid[1]:
            layers.append(_dense_report(name, module, "dense (density 1.0)", budgeted=True))
            continue
        sparse_module = _sparse_copy(module, block, densities[name], init)
        sparse_module.masked_dense = masked_dense and block != (1, 1) and _masked_dense_wins(sparse_module)
        parent, child = parent_module(model, name)
        setattr(parent, child, sparse_module)
        layers.append(_sparse_report(name, module, sparse_module, block))
    refuse_diffusers_save(model)
    return SparsityReport(layers, sparsity, distribution, block)


def densify(model: nn.Module) -> nn.Module:
    """Replaces every block-sparse module of ``model`` by a plain ``nn.Linear`` / ``nn.Conv2d``, in place.

    The dense weight is ``module.to_dense()`` (zeros at the dead blocks), exactly; the bias,
    stride, padding, dilation, device, dtype, ``requires_grad``, training flag and memory format
    (a channels-last convolution stays channels-last) are kept. Lifts the ``save_pretrained``
    refusal :func:`sparsify` put on diffusers models. Returns ``model`` (``model`` itself may be a
    block-sparse module: its dense replacement is returned then).
    """
    if isinstance(model, sk.BlockSparseModule):
        return _dense_copy(model)
    sparse = [(name, m) for name, m in model.named_modules() if isinstance(m, sk.BlockSparseModule)]
    for name, module in sparse:
        parent, child = parent_module(model, name)
        setattr(parent, child, _dense_copy(module))
    for module in model.modules():
        if isinstance(module.__dict__.get("save_pretrained"), _RefuseDiffusersSave):
            del module.__dict__["save_pretrained"]
    return model


def _dense_copy(module: sk.BlockSparseModule) -> nn.Module:
    """The plain ``nn.Linear`` / ``nn.Conv2d`` equal to ``module`` (its weights copied, not shared)."""
    values = module.values
    with torch.no_grad():
        weight = module.to_dense().detach().contiguous()
    if isinstance(module, sk.BlockSparseLinear):
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    elif isinstance(module, sk.BlockSparseConv2d):
        dense = nn.Conv2d(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
            padding_mode=module.padding_mode, device="meta",
        )
        if module.channels_last:
            weight = weight.contiguous(memory_format=torch.channels_last)
    else:
        raise TypeError(f"densify knows BlockSparseLinear and BlockSparseConv2d, got {type(module).__name__}")
    dense.weight = nn.Parameter(weight, requires_grad=values.requires_grad)
    if module.bias is not None:
        dense.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
    dense.train(module.training)
    return dense


class _RefuseDiffusersSave:
    """Stands in for diffusers' ``save_pretrained`` on a sparsified model (an instance attribute,
    so the class and every other model are untouched); picklable and copyable."""

    def __init__(self, class_name: str):
        self.class_name = class_name

    def __call__(self, *args, **kwargs):
        raise ValueError(
            f"this {self.class_name} has block-sparse layers that diffusers' save_pretrained would save as "
            "weights its from_pretrained cannot load: call sparse_diffusion.save_pretrained(model, directory) "
            "to keep it sparse, or sparse_diffusion.densify(model) then model.save_pretrained(directory) for a "
            "plain diffusers model"
        )


def refuse_diffusers_save(model: nn.Module) -> None:
    """Makes ``save_pretrained`` refuse on each diffusers model in ``model`` that holds a block-sparse layer."""
    modeling = sys.modules.get("diffusers.models.modeling_utils")  # a diffusers model implies it is imported
    if modeling is None:
        return
    for module in model.modules():
        if isinstance(module, modeling.ModelMixin) and any(
            isinstance(m, sk.BlockSparseModule) for m in module.modules()
        ):
            module.__dict__["save_pretrained"] = _RefuseDiffusersSave(type(module).__name__)


def _sparse_copy(module: nn.Module, block: Tuple[int, int], density: float, init: str) -> nn.Module:
    grid = (module.weight.shape[0] // block[0], module.weight.shape[1] // block[1])
    live = sk.blocks_for_density(min(density, 1.0), grid[0] * grid[1])
    with torch.no_grad():
        if init == "magnitude":
            mask = sk.largest_blocks_mask(sk.block_norms(module.weight, block), live)
        else:
            mask = sk.random_blocks_mask(grid, live, module.weight.device)
    cls = sk.BlockSparseLinear if isinstance(module, nn.Linear) else sk.BlockSparseConv2d
    sparse_module = cls.from_dense(module, block_size=block, block_mask=mask)
    sparse_module.train(module.training)
    return sparse_module


def _masked_dense_from(module: nn.Module) -> float:
    """The density from which dense kernels on the masked weight were measured faster."""
    if sk.capability.is_vector_block(module.layout.block_size):
        return MASKED_DENSE_FROM_VECTOR
    strided = isinstance(module, sk.BlockSparseConv2d) and module.stride != (1, 1)
    return MASKED_DENSE_FROM_STRIDED if strided else MASKED_DENSE_FROM


def _masked_dense_wins(module: nn.Module) -> bool:
    return module.density >= _masked_dense_from(module)


def _dense_report(name: str, module: nn.Module, reason: str, budgeted: bool) -> LayerReport:
    n = module.weight.numel()
    return LayerReport(name, type(module).__name__, tuple(module.weight.shape), None, 1.0, 0, 0, reason, n, n, n, n,
                       budgeted)


def _sparse_report(name: str, dense: nn.Module, sparse_module: nn.Module, block: Tuple[int, int]) -> LayerReport:
    values = sparse_module.values
    backend = sk.select_backend(values.device, values.dtype, block)
    if block == (1, 1):
        path = "reference (masked, block 1)"
    elif sparse_module.masked_dense:
        path = f"masked dense (density >= {_masked_dense_from(sparse_module)})"
    else:
        path = backend
    # One multiply-accumulate per (live) weight per output position.
    n, live = dense.weight.numel(), values.numel()
    total_blocks = sparse_module.grid[0] * sparse_module.grid[1]
    return LayerReport(
        name, type(dense).__name__, tuple(dense.weight.shape), block, live / n, sparse_module.nnz, total_blocks,
        path, n, live, n, live,
    )
