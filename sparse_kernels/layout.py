"""Block-sparse layout: which blocks of a weight live, and the index structures kernels walk.

A weight of shape ``[R * bo, C * bi]`` is cut into an ``R x C`` grid of ``bo x bi`` blocks.
``nnz`` of them live; their values sit in storage slots ``values[nnz, bo, bi, ...]``.
Slot ``s`` holds block ``(row_idx[s], col_idx[s])``. A slot keeps its place for its whole
life (so optimizer state never moves); only the index arrays change on a mask update.

Two index structures, rebuilt whenever the slots' coordinates change:

* row-sorted: ``row_slots`` lists the slots ordered by ``(row, col)`` and block-row ``r``
  owns ``row_slots[row_ptr[r]:row_ptr[r + 1]]``. The forward ``x @ W.T`` walks it.
* column-sorted: ``col_slots`` lists the slots ordered by ``(col, row)`` and block-column
  ``c`` owns ``col_slots[col_ptr[c]:col_ptr[c + 1]]``. The grad-input ``dy @ W`` walks it,
  so values are never transposed in memory.

Both are built by :func:`build_index`: a counting sort on the layout's device, in the
compiled extension (no host synchronisation on a GPU), or in plain torch
(:func:`build_index_reference`, same result) where the build has no kernel for the device or
there is no build: the layout needs nothing compiled.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

from . import extension
from .shapes import BlockSize, normalize_block_size

INDEX_DTYPE = torch.int32
Index = Tuple[Tensor, Tensor, Tensor, Tensor]


# --------------------------------------------------------------------------- index build
def build_index(row_idx: Tensor, col_idx: Tensor, grid: Tuple[int, int]) -> Index:
    """Row-sorted and column-sorted slot orders with their pointer arrays.

    Args:
        row_idx, col_idx: ``[nnz]`` integer block coordinates of each slot (distinct blocks).
        grid: ``(R, C)``.
    Returns:
        ``(row_ptr [R + 1], row_slots [nnz], col_ptr [C + 1], col_slots [nnz])``, int32:
        block-row ``r`` owns ``row_slots[row_ptr[r]:row_ptr[r + 1]]`` (ascending column),
        block-column ``c`` owns ``col_slots[col_ptr[c]:col_ptr[c + 1]]`` (ascending row).
    The compiled op ``sparse_kernels::build_index`` where the build has a kernel for the
    device (:func:`~sparse_kernels.extension.has_compiled_kernel`: a choice read off the
    build, whatever is registered), else :func:`build_index_reference`.
    """
    row_idx, col_idx = row_idx.to(INDEX_DTYPE).contiguous(), col_idx.to(INDEX_DTYPE).contiguous()
    if not extension.has_compiled_kernel("build_index", row_idx.device.type):
        return build_index_reference(row_idx, col_idx, grid)
    return tuple(torch.ops.sparse_kernels.build_index(row_idx, col_idx, grid[0], grid[1]))


def build_index_reference(row_idx: Tensor, col_idx: Tensor, grid: Tuple[int, int]) -> Index:
    """Pure torch :func:`build_index`: stable sorts by ``(row, col)`` and ``(col, row)``,
    pointers by ``searchsorted``."""
    num_rows, num_cols = grid
    rows, cols = row_idx.long(), col_idx.long()
    device = row_idx.device
    row_slots = torch.argsort(rows * num_cols + cols, stable=True)
    col_slots = torch.argsort(cols * num_rows + rows, stable=True)
    row_ptr = torch.searchsorted(rows[row_slots], torch.arange(num_rows + 1, device=device))
    col_ptr = torch.searchsorted(cols[col_slots], torch.arange(num_cols + 1, device=device))
    return tuple(t.to(INDEX_DTYPE) for t in (row_ptr, row_slots, col_ptr, col_slots))


# --------------------------------------------------------------------------- layout


class BlockSparseLayout:
    """Which blocks of a ``[R * bo, C * bi]`` weight live, and how kernels reach them.

    Build one with :meth:`from_block_mask` (or :meth:`from_indices` to fix the slot order).

    Attributes:
        shape: ``(out, in) == (R * bo, C * bi)``, the dense weight's shape (without conv taps).
        block_size: ``(bo, bi)``.
        grid: ``(R, C)``.
        row_idx, col_idx: int32 ``[nnz]``, the block coordinates of each storage slot.
        row_ptr, row_slots: int32 ``[R + 1]`` and ``[nnz]``, the row-sorted index.
        col_ptr, col_slots: int32 ``[C + 1]`` and ``[nnz]``, the column-sorted index.
    """

    __slots__ = (
        "shape",
        "block_size",
        "grid",
        "row_idx",
        "col_idx",
        "row_ptr",
        "row_slots",
        "col_ptr",
        "col_slots",
    )

    def __init__(
        self,
        grid: Tuple[int, int],
        block_size: Tuple[int, int],
        row_idx: torch.Tensor,
        col_idx: torch.Tensor,
        row_ptr: torch.Tensor,
        row_slots: torch.Tensor,
        col_ptr: torch.Tensor,
        col_slots: torch.Tensor,
    ):
        """Assembles a layout from parts that are already consistent; no checks.

        Users want :meth:`from_block_mask` or :meth:`from_indices`.
        """
        self.grid = grid
        self.block_size = block_size
        self.shape = (grid[0] * block_size[0], grid[1] * block_size[1])
        self.row_idx = row_idx
        self.col_idx = col_idx
        self.row_ptr = row_ptr
        self.row_slots = row_slots
        self.col_ptr = col_ptr
        self.col_slots = col_slots

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_size: BlockSize) -> "BlockSparseLayout":
        """Layout of the live blocks of ``block_mask``; slots in row-major block order.

        Args:
            block_mask: bool ``[R, C]``; ``True`` marks a live block.
            block_size: ``bo`` (square) or ``(bo, bi)``.
        """
        if not isinstance(block_mask, torch.Tensor):
            raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
        if block_mask.dim() != 2:
            raise ValueError(f"block_mask must be 2-D [R, C], got shape {tuple(block_mask.shape)}")
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a bool tensor, got dtype {block_mask.dtype}")
        row_idx, col_idx = torch.nonzero(block_mask, as_tuple=True)
        return cls.from_indices(row_idx, col_idx, tuple(block_mask.shape), block_size, check=False)

    @classmethod
    def from_indices(
        cls,
        row_idx: torch.Tensor,
        col_idx: torch.Tensor,
        grid: Sequence[int],
        block_size: BlockSize,
        check: bool = True,
    ) -> "BlockSparseLayout":
        """Layout whose slot ``s`` holds block ``(row_idx[s], col_idx[s])``.

        Args:
            row_idx, col_idx: integer ``[nnz]`` on one device.
            grid: ``(R, C)``.
            block_size: ``bo`` or ``(bo, bi)``.
            check: verify the coordinates are in range and distinct (synchronises with
                the device); internal callers that built valid indices pass ``False``.
        """
        block = normalize_block_size(block_size)
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2 or min(grid) < 0:
            raise ValueError(f"grid must be a pair of non-negative ints, got {grid}")
        for name, t in (("row_idx", row_idx), ("col_idx", col_idx)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 1:
                raise ValueError(f"{name} must be 1-D [nnz], got shape {tuple(t.shape)}")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
        if row_idx.shape != col_idx.shape:
            raise ValueError(
                f"row_idx and col_idx differ in shape: {tuple(row_idx.shape)} vs {tuple(col_idx.shape)}"
            )
        if row_idx.device != col_idx.device:
            raise ValueError(f"row_idx is on {row_idx.device} but col_idx on {col_idx.device}")
        if check:
            _check_coordinates(row_idx, col_idx, grid)
        row_idx = row_idx.to(INDEX_DTYPE).contiguous()
        col_idx = col_idx.to(INDEX_DTYPE).contiguous()
        return cls(grid, block, row_idx, col_idx, *build_index(row_idx, col_idx, grid))

    # ------------------------------------------------------------------ views
    @property
    def nnz(self) -> int:
        """Number of live blocks (storage slots)."""
        return self.row_idx.shape[0]

    @property
    def density(self) -> float:
        """Fraction of blocks that live."""
        total = self.grid[0] * self.grid[1]
        return self.nnz / total if total else 0.0

    @property
    def device(self) -> torch.device:
        return self.row_idx.device

    def block_mask(self) -> torch.Tensor:
        """bool ``[R, C]``, ``True`` at live blocks."""
        mask = torch.zeros(self.grid, dtype=torch.bool, device=self.device)
        mask[self.row_idx.long(), self.col_idx.long()] = True
        return mask

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """``(row_idx, col_idx, row_ptr, row_slots, col_ptr, col_slots)``, the order ops take."""
        return (self.row_idx, self.col_idx, self.row_ptr, self.row_slots, self.col_ptr, self.col_slots)

    def to(self, device: Union[str, torch.device]) -> "BlockSparseLayout":
        """The same layout with its index tensors on ``device``."""
        return BlockSparseLayout(
            self.grid, self.block_size, *(t.to(device) for t in self.tensors())
        )

    def __repr__(self) -> str:
        return (
            f"BlockSparseLayout(shape={self.shape}, block_size={self.block_size}, "
            f"nnz={self.nnz}/{self.grid[0] * self.grid[1]}, device={self.device})"
        )


def _check_coordinates(row_idx: torch.Tensor, col_idx: torch.Tensor, grid: Tuple[int, int]) -> None:
    """Raises ``ValueError`` for out-of-range or repeated block coordinates."""
    if row_idx.numel() == 0:
        return
    for name, t, bound in (("row_idx", row_idx, grid[0]), ("col_idx", col_idx, grid[1])):
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= bound:
            raise ValueError(f"{name} must lie in [0, {bound}), got values in [{low}, {high}]")
    flat = row_idx.long() * grid[1] + col_idx.long()
    if torch.unique(flat).numel() != flat.numel():
        raise ValueError("row_idx/col_idx name the same block in more than one slot")


def check_values(values: torch.Tensor, layout: BlockSparseLayout, taps: int = 0) -> None:
    """Raises unless ``values`` is a float tensor ``[nnz, bo, bi, *taps]`` for ``layout``.

    Args:
        taps: how many trailing kernel dimensions ``values`` carries (0 linear, 2 conv2d).
    """
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if not values.dtype.is_floating_point:
        raise TypeError(f"values must be a floating-point tensor, got dtype {values.dtype}")
    expected = (layout.nnz, *layout.block_size)
    if values.dim() != 3 + taps or tuple(values.shape[:3]) != expected:
        taps_text = ", kh, kw" if taps == 2 else ""
        raise ValueError(
            f"values must have shape [nnz, bo, bi{taps_text}] with (nnz, bo, bi) = {expected} "
            f"for {layout}, got {tuple(values.shape)}"
        )
    if values.device != layout.device:
        raise ValueError(f"values are on {values.device} but the layout is on {layout.device}")


def from_dense(weight: torch.Tensor, layout: BlockSparseLayout) -> torch.Tensor:
    """The live blocks of a dense weight, in slot order.

    Args:
        weight: ``[out, in]`` (linear) or ``[out, in, kh, kw]`` (conv), with
            ``(out, in) == layout.shape``.
    Returns:
        ``[nnz, bo, bi]`` or ``[nnz, bo, bi, kh, kw]``.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2 or tuple(weight.shape[:2]) != layout.shape:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not match the layout's shape {layout.shape}"
        )
    if weight.device != layout.device:
        raise ValueError(f"weight is on {weight.device} but the layout is on {layout.device}")
    (num_rows, num_cols), (bo, bi) = layout.grid, layout.block_size
    taps = tuple(weight.shape[2:])
    blocks = weight.reshape(num_rows, bo, num_cols, bi, *taps).transpose(1, 2)
    return blocks[layout.row_idx.long(), layout.col_idx.long()]


def to_dense(values: torch.Tensor, layout: BlockSparseLayout) -> torch.Tensor:
    """The dense weight with zeros at dead blocks; differentiable in ``values``.

    Args:
        values: ``[nnz, bo, bi]`` or ``[nnz, bo, bi, kh, kw]``.
    Returns:
        ``[out, in]`` or ``[out, in, kh, kw]``.
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() not in (3, 5):
        raise ValueError(f"values must be [nnz, bo, bi] or [nnz, bo, bi, kh, kw], got {tuple(values.shape)}")
    check_values(values, layout, taps=values.dim() - 3)
    (num_rows, num_cols), (bo, bi) = layout.grid, layout.block_size
    taps = tuple(values.shape[3:])
    blocks = values.new_zeros(num_rows, num_cols, bo, bi, *taps)
    blocks = blocks.index_put((layout.row_idx.long(), layout.col_idx.long()), values)
    return blocks.transpose(1, 2).reshape(num_rows * bo, num_cols * bi, *taps)
