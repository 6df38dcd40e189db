"""ChiroDiff noise predictors (Das et al., ICLR 2023) made only of ``nn.Linear`` projections.

ChiroDiff diffuses whole stroke sequences at once (non-autoregressively). A data item is
``points [B, L, 3]`` with rows ``(x, y, pen)`` and ``lengths [B]``: ``pen == 1`` marks the last
point of a stroke and rows at and after ``lengths[b]`` are padding. All three channels are
noised; the network predicts the noise of every point.

Every projection here is a plain ``nn.Linear`` so that :func:`sparse_diffusion.sparsify` can
turn it into a block-sparse layer. That rules out ``nn.GRU`` (raw ``Parameter`` weights) and
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (``Linear`` subclasses and raw
``in_proj_weight``): :class:`BiGRU` and :class:`TransformerBackbone` are written out instead.

    net = ChiroDiffNet("gru")                      # the paper's model: 3-layer BiGRU, hidden 96
    eps = net(x_t, timesteps, lengths)              # [B, L, 3], exactly 0 on padded rows
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BiGRU", "ChiroDiffNet", "FourierTimeEmbedding", "GRUDirection", "TransformerBackbone", "TransformerBlock"]

KINDS = ("gru", "transformer")


def length_mask(lengths: Tensor, length: int) -> Tensor:
    """bool ``[B, L]``: ``True`` on the valid rows ``l < lengths[b]``. lengths: int ``[B]``."""
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


# --------------------------------------------------------------------------- time embedding
class FourierTimeEmbedding(nn.Module):
    """Random Fourier features of the diffusion time.

    ``t`` is normalised to ``t / num_train_timesteps`` and embedded as
    ``[sin(2 pi t w), cos(2 pi t w)]`` with fixed frequencies ``w ~ N(0, scale^2)`` of size
    ``features / 2``, drawn from a generator seeded with ``seed`` (so every construction with
    the same seed embeds identically, whatever torch's global RNG state) and kept as a buffer.

    Args:
        features: output size, even.
        num_train_timesteps: ``T``; timesteps are expected in ``[0, T)``.
        scale: standard deviation of the frequencies (in cycles over ``t / T`` in ``[0, 1)``).
        seed: seed of the frequencies.
    """

    def __init__(self, features: int = 8, num_train_timesteps: int = 1000, scale: float = 4.0, seed: int = 0):
        super().__init__()
        if features < 2 or features % 2:
            raise ValueError(f"time features must be a positive even number, got {features}")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
        self.features, self.num_train_timesteps = features, num_train_timesteps
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(features // 2, generator=generator) * scale)

    def forward(self, timesteps: Tensor) -> Tensor:
        """timesteps: int or float ``[B]`` -> float32 ``[B, features]``."""
        t = timesteps.to(self.freqs.dtype) / self.num_train_timesteps
        phase = 2 * math.pi * t[:, None] * self.freqs[None, :]
        return torch.cat([phase.sin(), phase.cos()], dim=-1)


# --------------------------------------------------------------------------- GRU
class GRUDirection(nn.Module):
    """One direction of one GRU layer, with PyTorch's gate equations (order r, z, n)::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    ``input_proj`` holds ``[W_ir; W_iz; W_in]`` (``nn.GRU``'s ``weight_ih``) and
    ``recurrent_proj`` holds ``[W_hr; W_hz; W_hn]`` (``weight_hh``), biases included.

    Masked steps carry the state unchanged. Running forwards, the state thus freezes after a
    sequence's last valid point; running backwards (``reverse=True``), it stays at its initial
    zero through the padding and starts at the last valid point, so padding never reaches a
    valid row.
    """

    def __init__(self, input_size: int, hidden_size: int, reverse: bool = False):
        super().__init__()
        self.hidden_size, self.reverse = hidden_size, reverse
        self.input_proj = nn.Linear(input_size, 3 * hidden_size)
        self.recurrent_proj = nn.Linear(hidden_size, 3 * hidden_size)

    def step(self, gates_x: Tensor, h: Tensor) -> Tensor:
        """One update. gates_x: ``[B, 3H]`` (``input_proj`` of this step's input); h: ``[B, H]`` -> ``[B, H]``."""
        r_x, z_x, n_x = gates_x.chunk(3, dim=-1)
        r_h, z_h, n_h = self.recurrent_proj(h).chunk(3, dim=-1)
        r = torch.sigmoid(r_x + r_h)
        z = torch.sigmoid(z_x + z_h)
        n = torch.tanh(n_x + r * n_h)
        return n + z * (h - n)  # (1 - z) * n + z * h

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: ``[B, L, in]``; mask: bool ``[B, L]`` (``None``: all valid) -> ``[B, L, H]``, 0 on masked rows.

        The input projection runs once over all steps; the recurrence is a Python loop of
        ``L`` steps (one ``[B, H] x [H, 3H]`` product and a few elementwise ops each).
        """
        batch, length, _ = x.shape
        gates_x = self.input_proj(x)
        h = x.new_zeros(batch, self.hidden_size)
        outputs = [h] * length
        for t in (range(length - 1, -1, -1) if self.reverse else range(length)):
            h_new = self.step(gates_x[:, t], h)
            h = h_new if mask is None else torch.where(mask[:, t, None], h_new, h)
            outputs[t] = h
        out = torch.stack(outputs, dim=1)
        return out if mask is None else out.masked_fill(~mask[..., None], 0.0)


class BiGRULayer(nn.Module):
    """A forward and a backward :class:`GRUDirection`, outputs concatenated ``[fwd, bwd]``."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.fwd = GRUDirection(input_size, hidden_size, reverse=False)
        self.bwd = GRUDirection(input_size, hidden_size, reverse=True)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: ``[B, L, in]``; mask: bool ``[B, L]`` or ``None`` -> ``[B, L, 2H]``."""
        return torch.cat([self.fwd(x, mask), self.bwd(x, mask)], dim=-1)


class BiGRU(nn.Module):
    """Multi-layer bidirectional GRU from ``nn.Linear`` only (2 per direction per layer).

    Equivalent to ``nn.GRU(input_size, hidden_size, num_layers, batch_first=True,
    bidirectional=True)`` (no dropout) with the weights of layer ``k`` mapped as
    ``weight_ih_l{k}[_reverse] -> layers[k].{fwd,bwd}.input_proj.weight`` and
    ``weight_hh_l{k}[_reverse] -> layers[k].{fwd,bwd}.recurrent_proj.weight`` (biases alike).
    With a mask it equals ``nn.GRU`` on a packed sequence.

    Cost: ``2 * num_layers * L`` sequential steps in Python, i.e. about ``10 * 2 * num_layers * L``
    small kernels per forward (3840 for the paper's model at L = 64): fine for L of 64 to 128,
    launch-bound on a GPU.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.layers = nn.ModuleList(
            BiGRULayer(input_size if k == 0 else 2 * hidden_size, hidden_size) for k in range(num_layers)
        )

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: ``[B, L, input_size]``; mask: bool ``[B, L]`` (valid rows) or ``None`` -> ``[B, L, 2 * hidden_size]``."""
        for layer in self.layers:
            x = layer(x, mask)
        return x


# --------------------------------------------------------------------------- transformer
def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> Tensor:
    """``[L, dim]``: ``sin(l / 10000^(2i/dim))`` in even columns, ``cos`` in odd ones."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : dim // 2]
    return table.to(dtype)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h + attn(norm1(h))``, then ``h + mlp(norm2(h))``.

    Attention uses ``q``, ``k``, ``v``, ``out`` (all ``nn.Linear(dim, dim)``) and
    ``F.scaled_dot_product_attention``; the MLP is ``Linear(dim, 4 dim) -> GELU -> Linear(4 dim, dim)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size must be divisible by num_heads, got hidden_size={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h: Tensor, key_mask: Tensor) -> Tensor:
        """h: ``[B, L, dim]``; key_mask: bool ``[B, 1, 1, L]`` (``True``: may be attended to) -> ``[B, L, dim]``."""
        batch, length, dim = h.shape
        y = self.norm1(h)

        def heads(t: Tensor) -> Tensor:  # [B, L, dim] -> [B, heads, L, dim / heads]
            return t.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(heads(self.q(y)), heads(self.k(y)), heads(self.v(y)), attn_mask=key_mask)
        h = h + self.out(attn.transpose(1, 2).reshape(batch, length, dim))
        return h + self.mlp(self.norm2(h))


class TransformerBackbone(nn.Module):
    """Sinusoidal positions, ``num_layers`` :class:`TransformerBlock` and a final LayerNorm."""

    def __init__(self, dim: int, num_layers: int, num_heads: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """h: ``[B, L, dim]``; mask: bool ``[B, L]`` (valid rows) -> ``[B, L, dim]``.

        Padded keys are masked out. A sequence without any valid row attends to all its rows
        instead (which avoids NaN from an all-masked softmax); its outputs are zeroed by the caller.
        """
        batch, length, dim = h.shape
        h = h + sinusoidal_positions(length, dim, h.device, h.dtype)
        key_mask = (mask | ~mask.any(dim=1, keepdim=True))[:, None, None, :]
        for block in self.blocks:
            h = block(h, key_mask)
        return self.norm(h)


# --------------------------------------------------------------------------- the network
class ChiroDiffNet(nn.Module):
    """ChiroDiff's noise predictor over padded point sequences.

    Per point: features ``[x, y, dx, dy, pen]`` (position, velocity to the previous valid point,
    0 for the first; channels past the first two are passed as they are) concatenated with
    ``time_mlp(FourierTimeEmbedding(t))``, projected by ``input_proj`` to ``hidden_size``, run
    through the backbone and mapped back to ``in_channels`` by ``head``.

    Args:
        kind: ``"gru"`` (:class:`BiGRU`, the paper's model) or ``"transformer"``
            (:class:`TransformerBackbone`).
        hidden_size: GRU state size per direction, or transformer width.
        num_layers: GRU layers or transformer blocks.
        time_features: size of the Fourier time embedding (and of the time MLP's output).
        num_train_timesteps: ``T`` of the diffusion; timesteps are normalised by it.
        num_heads: attention heads (transformer only); must divide ``hidden_size``.
        in_channels: channels per point; the first two are the position ``(x, y)``.
    """

    def __init__(
        self,
        kind: str = "gru",
        hidden_size: int = 96,
        num_layers: int = 3,
        time_features: int = 8,
        num_train_timesteps: int = 1000,
        num_heads: int = 4,
        in_channels: int = 3,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if in_channels < 2:
            raise ValueError(f"in_channels must be at least 2 (x, y), got {in_channels}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        if kind == "transformer" and hidden_size % num_heads:
            raise ValueError(
                f"hidden_size must be divisible by num_heads, got hidden_size={hidden_size}, num_heads={num_heads}"
            )
        self.kind, self.in_channels, self.hidden_size = kind, in_channels, hidden_size
        self.time_embedding = FourierTimeEmbedding(time_features, num_train_timesteps)
        self.time_mlp = nn.Sequential(
            nn.Linear(time_features, 4 * time_features), nn.SiLU(), nn.Linear(4 * time_features, time_features)
        )
        self.input_proj = nn.Linear(in_channels + 2 + time_features, hidden_size)
        if kind == "gru":
            self.backbone = BiGRU(hidden_size, hidden_size, num_layers)
            self.head = nn.Linear(2 * hidden_size, in_channels)
        else:
            self.backbone = TransformerBackbone(hidden_size, num_layers, num_heads)
            self.head = nn.Linear(hidden_size, in_channels)

    def _check(self, x_t: Tensor, timesteps: Tensor, lengths: Tensor) -> None:
        if x_t.dim() != 3 or x_t.shape[-1] != self.in_channels:
            raise ValueError(f"x_t must be [B, L, {self.in_channels}], got shape {tuple(x_t.shape)}")
        batch, length = x_t.shape[:2]
        if lengths.dim() != 1 or lengths.shape[0] != batch:
            raise ValueError(f"lengths must be [B] = [{batch}], got shape {tuple(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
        if batch and (int(lengths.min()) < 0 or int(lengths.max()) > length):
            raise ValueError(f"lengths must lie in [0, L={length}], got {lengths.tolist()}")
        if timesteps.dim() != 1 or timesteps.shape[0] != batch:
            raise ValueError(f"timesteps must be [B] = [{batch}], got shape {tuple(timesteps.shape)}")

    def features(self, x_t: Tensor, mask: Tensor) -> Tensor:
        """Per-point features ``[B, L, in_channels + 2]``: ``(x, y, dx, dy, rest)``, 0 on padded rows.

        Padded rows are zeroed before the difference, and a valid row's previous row is valid,
        so padding never enters a valid row's velocity.
        """
        x_t = x_t.masked_fill(~mask[..., None], 0.0)
        xy = x_t[..., :2]
        velocity = torch.cat([torch.zeros_like(xy[:, :1]), xy[:, 1:] - xy[:, :-1]], dim=1)
        velocity = velocity.masked_fill(~mask[..., None], 0.0)
        return torch.cat([xy, velocity, x_t[..., 2:]], dim=-1)

    def forward(self, x_t: Tensor, timesteps, lengths: Tensor) -> Tensor:
        """x_t: ``[B, L, in_channels]``; timesteps: int or float ``[B]`` in ``[0, num_train_timesteps)``
        (a Python number or 0-d tensor is broadcast); lengths: int64 ``[B]`` in ``[0, L]``.

        Returns the predicted noise ``[B, L, in_channels]``; rows at and after ``lengths[b]``
        are exactly 0, and valid rows do not depend on the padding's content or amount.
        """
        if not torch.is_tensor(timesteps) or timesteps.dim() == 0:
            timesteps = torch.as_tensor(timesteps, device=x_t.device).expand(x_t.shape[0] if x_t.dim() else 0)
        self._check(x_t, timesteps, lengths)
        batch, length, _ = x_t.shape
        lengths = lengths.to(x_t.device)
        mask = length_mask(lengths, length)

        time = self.time_mlp(self.time_embedding(timesteps.to(x_t.device)).to(x_t.dtype))
        features = torch.cat([self.features(x_t, mask), time[:, None, :].expand(batch, length, -1)], dim=-1)
        h = self.input_proj(features.masked_fill(~mask[..., None], 0.0))
        h = self.backbone(h, mask)
        return self.head(h).masked_fill(~mask[..., None], 0.0)
