"""Block-sparse modules: ``BlockSparseLinear`` and ``BlockSparseConv2d``.

A module's only weight parameter is ``values [nnz, bo, bi, ...]``: weights, gradients and
optimizer state hold live blocks only. The layout lives in buffers: ``row_idx`` and
``col_idx`` are saved in the ``state_dict`` (loading one restores the mask), the index
structures derived from them are rebuilt on load and never saved.

``forward`` calls the op straight through torch's dispatcher with the module's tensors (the
kernels check them), reached through :func:`sparse_kernels.registry.ops` (a flag test once the
kernels are registered), so a layer costs about what ``nn.Linear`` / ``nn.Conv2d`` cost besides
its kernels; :func:`~sparse_kernels.bsr_linear` and :func:`~sparse_kernels.bsr_conv2d` are
the checked functional forms. Building a module needs no compiled code (the layout falls back
to plain torch); its first forward does.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .layout import BlockSparseLayout, build_index, from_dense, to_dense
from .masks.op import block_norms
from .registry import ops
from .shapes import BlockSize, explicit_padding, normalize_block_size

_DERIVED_INDEX = ("row_ptr", "row_slots", "col_ptr", "col_slots")
_INDEX = ("row_idx", "col_idx") + _DERIVED_INDEX


def blocks_for_density(density: float, total_blocks: int) -> int:
    """How many of ``total_blocks`` live at ``density``: rounded, at least one if ``density > 0``."""
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    live = round(density * total_blocks)
    return max(live, 1) if density > 0 and total_blocks > 0 else live


def largest_blocks_mask(scores: torch.Tensor, live: int) -> torch.Tensor:
    """bool mask of the ``live`` highest-scoring blocks; ties go to the lower flat index."""
    order = torch.argsort(scores.flatten(), descending=True, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order[:live]] = True
    return mask.view(scores.shape)


def random_blocks_mask(
    grid: Tuple[int, int], live: int, device=None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """bool mask of ``live`` blocks drawn uniformly without replacement."""
    total = grid[0] * grid[1]
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=generator)[:live]] = True
    return mask.view(grid).to(device)


def _check_divisible(kind: str, features: Tuple[int, int], block: Tuple[int, int]) -> Tuple[int, int]:
    """The block grid ``(R, C)``; ``ValueError`` if the block does not divide the weight."""
    (out_features, in_features), (bo, bi) = features, block
    if out_features % bo or in_features % bi:
        raise ValueError(
            f"{kind}: block size {block} does not divide the weight's ({out_features}, {in_features}) "
            f"(out x in) features"
        )
    return out_features // bo, in_features // bi


class BlockSparseModule(nn.Module):
    """Holds a layout in buffers and a ``values`` parameter; subclasses define ``forward``.

    Attributes:
        values: ``nn.Parameter [nnz, bo, bi, *taps]``, the only weight parameter.
        layout: the current :class:`BlockSparseLayout` (built from the buffers on access).
        masked_dense: run the dense op on the scattered weight ``to_dense()`` instead of the
            block-sparse kernels (same storage, same gradients). Faster for layers close to
            dense: :func:`sparse_diffusion.sparsify` sets it from a measured density threshold.
    """

    masked_dense = False

    def _init_sparse(
        self,
        features: Tuple[int, int],
        taps: Tuple[int, ...],
        block_size: BlockSize,
        density: float,
        block_mask: Optional[torch.Tensor],
        device=None,
        dtype=None,
    ) -> None:
        """Sets up the layout buffers and an uninitialised ``values [nnz, bo, bi, *taps]``.

        ``block_mask`` (bool ``[R, C]``) fixes the live blocks; ``None`` draws
        ``density`` of them at random.
        """
        self.block_size = normalize_block_size(block_size)
        self.grid = _check_divisible(type(self).__name__, features, self.block_size)
        if block_mask is None:
            block_mask = random_blocks_mask(self.grid, blocks_for_density(density, self.grid[0] * self.grid[1]))
        if not isinstance(block_mask, torch.Tensor) or tuple(block_mask.shape) != self.grid:
            shape = tuple(block_mask.shape) if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
            raise ValueError(f"block_mask must be a bool tensor of shape {self.grid}, got {shape}")
        layout = BlockSparseLayout.from_block_mask(block_mask.to(device), self.block_size)
        self.values = nn.Parameter(torch.empty(layout.nnz, *self.block_size, *taps, device=device, dtype=dtype))
        self.register_buffer("row_idx", layout.row_idx)
        self.register_buffer("col_idx", layout.col_idx)
        for name in _DERIVED_INDEX:
            self.register_buffer(name, getattr(layout, name), persistent=False)

    def _uniform_init(self, fan_in: int) -> None:
        """Values and bias uniform in ``+-1 / sqrt(fan_in)``: the scale ``nn.Linear`` and
        ``nn.Conv2d`` give their dense weights (``fan_in`` counts the dense inputs)."""
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(self.values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _index(self) -> Tuple[torch.Tensor, ...]:
        """The six index buffers in the ops' order (read from ``_buffers``: forward's hot path)."""
        buffers = self._buffers
        return tuple(buffers[name] for name in _INDEX)

    @property
    def layout(self) -> BlockSparseLayout:
        return BlockSparseLayout(
            self.grid, self.block_size, self.row_idx, self.col_idx,
            self.row_ptr, self.row_slots, self.col_ptr, self.col_slots,
        )

    @property
    def nnz(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        """Fraction of the weight's blocks that live."""
        return self.layout.density

    def to_dense(self) -> torch.Tensor:
        """The dense weight with zeros at dead blocks (differentiable in ``values``)."""
        return to_dense(self.values, self.layout)

    def rebuild_index(self) -> None:
        """Recomputes the derived index buffers from ``row_idx`` / ``col_idx``, in place."""
        for name, tensor in zip(_DERIVED_INDEX, build_index(self.row_idx, self.col_idx, self.grid)):
            getattr(self, name).copy_(tensor)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        rows, cols = state_dict.get(prefix + "row_idx"), state_dict.get(prefix + "col_idx")
        if rows is not None and cols is not None:
            # Validates the incoming mask, and makes room for one with another block count.
            BlockSparseLayout.from_indices(rows, cols, self.grid, self.block_size)
            if rows.shape[0] != self.nnz:
                self._resize_slots(rows.shape[0])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self.rebuild_index()

    @classmethod
    def _from_dense_weight(
        cls,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        block_size: BlockSize,
        density: float,
        block_mask: Optional[torch.Tensor],
        **kwargs,
    ):
        """A module of this class with ``weight``'s values at the blocks of ``block_mask``,
        or (``None``) at its ``density`` largest-norm blocks (ties: lower index).

        ``kwargs`` are the constructor's shape arguments.
        """
        block = normalize_block_size(block_size)
        grid = _check_divisible(cls.__name__, tuple(weight.shape[:2]), block)
        mask = block_mask
        if mask is None:
            mask = largest_blocks_mask(block_norms(weight, block), blocks_for_density(density, grid[0] * grid[1]))
        module = cls(
            **kwargs, bias=bias is not None, block_size=block, device=weight.device, dtype=weight.dtype, block_mask=mask
        )
        with torch.no_grad():
            module.values.copy_(from_dense(weight, module.layout))
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def _resize_slots(self, nnz: int) -> None:
        """New (uninitialised) storage for ``nnz`` slots; replaces the ``values`` parameter."""
        values = self.values
        self.values = nn.Parameter(values.new_empty(nnz, *values.shape[1:]), requires_grad=values.requires_grad)
        for name in ("row_idx", "col_idx", "row_slots", "col_slots"):
            setattr(self, name, getattr(self, name).new_empty(nnz))


class BlockSparseLinear(BlockSparseModule):
    """``nn.Linear`` whose weight ``[out, in]`` is block-sparse: ``y = x @ W.T + b``.

    Args:
        in_features, out_features: as ``nn.Linear``; each divisible by its block side.
        bias: learn an additive bias.
        block_size: ``bo`` or ``(bo, bi)``.
        density: fraction of blocks that live, drawn uniformly at random (torch's RNG).
        block_mask: bool ``[out / bo, in / bi]``; overrides ``density``.
    Live values start as ``nn.Linear`` starts its dense weight (uniform, bound
    ``1 / sqrt(in_features)``), so the dense initialisation's scale is kept.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: BlockSize = 32,
        density: float = 0.25,
        device=None,
        dtype=None,
        block_mask: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_sparse((out_features, in_features), (), block_size, density, block_mask, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._uniform_init(self.in_features)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        block_size: BlockSize = 32,
        density: float = 0.25,
        block_mask: Optional[torch.Tensor] = None,
    ) -> "BlockSparseLinear":
        """A block-sparse copy of ``linear``: its largest-norm blocks (ties: lower index), or
        the blocks of ``block_mask`` (bool ``[out / bo, in / bi]``) when given."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        return cls._from_dense_weight(
            linear.weight, linear.bias, block_size, density, block_mask,
            in_features=linear.in_features, out_features=linear.out_features,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in_features]`` -> ``[..., out_features]``."""
        parameters = self._parameters
        if self.masked_dense:
            return F.linear(x, self.to_dense(), parameters.get("bias"))
        return ops().bsr_linear.default(x, parameters["values"], parameters.get("bias"), *self._index())

    def dense_weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The gradient of the whole dense weight ``[out, in]`` (fp32) for one call with input
        ``x [..., in]`` and output gradient ``grad_out [..., out]``, dead blocks included
        (RigL's grow scores). Costs a dense product: for update steps only."""
        return grad_out.reshape(-1, self.out_features).float().T @ x.reshape(-1, self.in_features).float()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.block_size}, "
            f"density={self.density:.3f} ({self.nnz}/{self.grid[0] * self.grid[1]} blocks)"
            + (", masked_dense=True" if self.masked_dense else "")
        )


class BlockSparseConv2d(BlockSparseModule):
    """``nn.Conv2d`` whose weight ``[Cout, Cin, kh, kw]`` is block-sparse over channel blocks.

    The layout is ``[Cout / bo, Cin / bi]``; a live block is a ``bo x bi`` tile of channels
    with all its ``kh x kw`` taps, so ``values`` is ``[nnz, bo, bi, kh, kw]``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as
            ``nn.Conv2d``; channels divisible by the block sides.
        groups, padding_mode: only ``1`` and ``"zeros"``; others raise ``ValueError``.
        block_size: ``bo`` or ``(bo, bi)``.
        density: fraction of blocks that live, drawn at random (torch's RNG).
        block_mask: bool ``[Cout / bo, Cin / bi]``; overrides ``density``.
    Live values start as ``nn.Conv2d`` starts its weight (uniform, bound
    ``1 / sqrt(Cin * kh * kw)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding: Union[int, Tuple[int, int], str] = 0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        block_size: BlockSize = 32,
        density: float = 0.25,
        device=None,
        dtype=None,
        block_mask: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        _check_conv_options(type(self).__name__, groups, padding_mode)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _as_pair(kernel_size)
        self.stride, self.dilation = _as_pair(stride), _as_pair(dilation)
        self.padding = padding if isinstance(padding, str) else _as_pair(padding)
        self.groups, self.padding_mode = groups, padding_mode
        self.channels_last = False
        self._init_sparse((out_channels, in_channels), self.kernel_size, block_size, density, block_mask, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._uniform_init(self.in_channels * self.kernel_size[0] * self.kernel_size[1])

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        block_size: BlockSize = 32,
        density: float = 0.25,
        block_mask: Optional[torch.Tensor] = None,
    ) -> "BlockSparseConv2d":
        """A block-sparse copy of ``conv``: its largest-norm blocks (ties: lower index), or
        the blocks of ``block_mask`` (bool ``[Cout / bo, Cin / bi]``) when given.

        Refuses (``ValueError``) what the kernels cannot take: groups, a padding mode other
        than zeros, channels not divisible by the block.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        _check_conv_options(cls.__name__, conv.groups, conv.padding_mode)
        return cls._from_dense_weight(
            conv.weight, conv.bias, block_size, density, block_mask,
            in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        )

    def _apply(self, fn, recurse=True):
        # model.to(memory_format=torch.channels_last) converts every 4-D and 5-D tensor, and
        # 5-D ones have no channels-last form: the values [nnz, bo, bi, kh, kw] go through
        # the conversion as a 3-D view (device and dtype change; their layout stays). What the
        # conversion does to the memory format is read off two probes: one contiguous and one
        # channels-last 4-D tensor that both come out channels-last mean "to channels-last".
        def convert(t):
            if t.dim() != 5:
                return fn(t)
            return fn(t.reshape(t.shape[0], t.shape[1], -1)).reshape(t.shape)

        probe = self.values.new_empty(1, 2, 2, 2)
        probes = [fn(probe), fn(probe.contiguous(memory_format=torch.channels_last))]
        formats = {p.is_contiguous(memory_format=torch.channels_last) for p in probes if p.dim() == 4}
        if len(formats) == 1:
            self.channels_last = formats.pop()
        return super()._apply(convert, recurse)

    def _explicit_padding(self) -> Tuple[int, int]:
        if isinstance(self.padding, str):
            return explicit_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        return self.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[N, Cin, H, W]`` (or ``[Cin, H, W]``) -> ``[N, Cout, OH, OW]``; channels-last when
        ``x`` is, or when the module is (``channels_last``: set by
        ``model.to(memory_format=torch.channels_last)``, as ``nn.Conv2d`` with a channels-last
        weight gives channels-last outputs)."""
        parameters = self._parameters
        if self.masked_dense:
            values = parameters["values"]
            if self.kernel_size == (1, 1):
                values = _GradInStandardStrides.apply(values)
            weight = to_dense(values, self.layout)
            if self.channels_last:
                weight = weight.contiguous(memory_format=torch.channels_last)
            return F.conv2d(x, weight, parameters.get("bias"), self.stride, self._explicit_padding(), self.dilation)
        unbatched = x.dim() == 3
        y = ops().bsr_conv2d.default(x.unsqueeze(0) if unbatched else x, parameters["values"], parameters.get("bias"),
                                     *self._index(), self.stride, self._explicit_padding(), self.dilation,
                                     self.channels_last)
        return y.squeeze(0) if unbatched else y

    def dense_weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The gradient of the whole dense weight ``[Cout, Cin, kh, kw]`` (fp32) for one call
        with input ``x`` and output gradient ``grad_out``, dead blocks included (RigL's grow
        scores). Costs a dense weight-gradient convolution: for update steps only."""
        padding = self._explicit_padding()
        if x.dim() == 3:  # unbatched
            x, grad_out = x.unsqueeze(0), grad_out.unsqueeze(0)
        weight_shape = (self.out_channels, self.in_channels, *self.kernel_size)
        return torch.nn.grad.conv2d_weight(
            x.float(), weight_shape, grad_out.float(), self.stride, padding, self.dilation
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, density={self.density:.3f} "
            f"({self.nnz}/{self.grid[0] * self.grid[1]} blocks)"
            + (", masked_dense=True" if self.masked_dense else "")
        )


class _GradInStandardStrides(torch.autograd.Function):
    """The identity, whose backward gives the gradient the standard contiguous strides. A 1x1
    convolution's weight gradient from channels-last activations carries channels-last strides
    on its size-1 tap dimensions, and so would the values' gradient gathered from it; DDP's
    gradient buckets expect a parameter's own strides (and warn on every other)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor) -> torch.Tensor:
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        standard = torch.empty(grad.shape, device="meta").stride()
        return grad if grad.stride() == standard else grad.clone(memory_format=torch.contiguous_format)


def _as_pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _check_conv_options(kind: str, groups: int, padding_mode: str) -> None:
    """Refuses the convolution options the block-sparse kernels do not implement."""
    if groups != 1:
        raise ValueError(f"{kind}: groups={groups} is not supported; block-sparse convolutions need groups=1")
    if padding_mode != "zeros":
        raise ValueError(f"{kind}: padding_mode={padding_mode!r} is not supported, only 'zeros'")
