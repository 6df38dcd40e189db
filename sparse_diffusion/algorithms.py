"""Static-DM, RigL-DM and MagRan-DM: one update loop, different grow scores.

Call ``algo.step()`` once per iteration, after ``optimizer.step()``. Every
``update_interval`` steps until ``stop * total_steps``, each block-sparse layer drops the
``k = floor(f(t) * nnz)`` live blocks with the smallest weight norm, where ``f`` anneals
``drop_fraction`` to 0, then grows ``k`` blocks among all blocks inactive after the drop, as
the RigL paper's algorithm and Google's reference code do: a block just dropped can be
regrown, and then keeps its slot, values and optimizer state, as if it had not been dropped,
so ``k`` or fewer blocks move. ``regrow_dropped=False`` grows only among the blocks dead
before the update, so that exactly ``k`` move (this package's behaviour before it followed
the paper). ``history`` records both counts per layer: ``dropped`` and ``moved`` (net).

* ``Static``: never changes a mask;
* ``RigL``: grows the dead blocks with the largest norm of the dense weight gradient of the
  update step's batch. The gradient is collected only on update steps (the algorithm arms
  the layers for that backward), and each layer's is reduced to its block norms as soon as
  that layer's backward is done and freed (under ``torch.distributed`` it is all-reduced
  first, so every rank picks the same blocks): at most a few layers' dense gradients exist at
  once, so an update step costs no more memory than any other. With several backward passes
  before one optimizer step, a block's score is the sum of its norms over the passes;
* ``MagRan``: grows uniformly at random, from a generator seeded alike on every rank, from
  the same candidates as RigL: Google's reference SET (the random-growth baseline of the
  RigL paper) shares RigL's update, so a just-dropped block may come back there too, with
  probability ``k / (inactive blocks)``; ``regrow_dropped=False`` is the exactly-``k`` SET.

Newly grown blocks start at zero, and so does their state in the optimizer (every state tensor
of the values' shape, e.g. Adam's ``exp_avg`` and ``exp_avg_sq``) and in an EMA of the
model when one is given. Updates run through :func:`sparse_kernels.prune_and_regrow`
(the compiled op, one call for all layers). A step whose gradients are not finite (an AMP
overflow) skips its update with a warning.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

import sparse_kernels as sk
from sparse_kernels import BlockSparseModule

ANNEALS = ("cosine", "linear", "constant")


class DynamicSparsity:
    """The shared update loop. Subclasses define :meth:`grow_scores` (``None``: static).

    Args:
        model: a model with block-sparse layers (see :func:`sparse_diffusion.sparsify`);
            a ``DistributedDataParallel`` wrapper is fine.
        optimizer: its state tensors shaped like a layer's values are zeroed with the slot.
        total_steps: optimizer steps of the whole run.
        update_interval: steps between mask updates.
        drop_fraction: the fraction of each layer's live blocks moved at the first update.
        anneal: how the fraction decays to 0 at ``stop * total_steps``: ``cosine``,
            ``linear`` or ``constant``.
        stop: fraction of the run after which masks stay fixed.
        seed: seeds the generator of random choices (identical on every rank).
        ema: an EMA of the model whose shadow parameters line up with
            ``model.parameters()`` (diffusers' ``EMAModel``, or a list of tensors); its
            shadows are looked up at each update, so ``ema.load_state_dict`` is safe.
        regrow_dropped: grow among every block inactive after the drop, the just-dropped
            ones included (the RigL paper); ``False``: only among the blocks dead before
            the update, so that exactly ``k`` blocks move.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        update_interval: int = 100,
        drop_fraction: float = 0.3,
        anneal: str = "cosine",
        stop: float = 0.75,
        seed: int = 0,
        ema=None,
        regrow_dropped: bool = True,
    ):
        if not isinstance(update_interval, int) or update_interval < 1:
            raise ValueError(f"update_interval must be a positive int, got {update_interval!r}")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if self.updates_masks and total_steps < update_interval:
            raise ValueError(f"total_steps ({total_steps}) must be >= update_interval ({update_interval}): "
                             "no mask update would happen")
        if not 0.0 <= drop_fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction!r}")
        if anneal not in ANNEALS:
            raise ValueError(f"anneal must be one of {ANNEALS}, got {anneal!r}")
        if not 0.0 < stop <= 1.0:
            raise ValueError(f"stop must be in (0, 1], got {stop!r}")
        self.layers: List[Tuple[str, BlockSparseModule]] = [
            (name, m) for name, m in model.named_modules() if isinstance(m, BlockSparseModule)
        ]
        if not self.layers:
            raise ValueError("the model has no block-sparse layer: call sparse_diffusion.sparsify(model, ...) first")
        self.model, self.optimizer = model, optimizer
        self.total_steps, self.update_interval = total_steps, update_interval
        self.drop_fraction, self.anneal, self.stop, self.seed = drop_fraction, anneal, stop, seed
        self.regrow_dropped = bool(regrow_dropped)
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.history: List[Dict] = []
        self.ever_live = [m.layout.block_mask() for _, m in self.layers]
        self.ema = ema
        _ema_shadows(model, ema)  # checks that the EMA lines up with the model
        self._warned_k_zero = False
        self._armed = False
        self._dense_grads: Dict[int, Tensor] = {}  # a layer's dense gradient, until its backward is done
        self._grow_norms: Dict[int, Tensor] = {}  # then its block norms
        self._hooks: List = []  # the collectors, registered only while armed
        self._arm_if_next_updates()

    # ------------------------------------------------------------------ schedule
    grows_by_gradient = False
    updates_masks = True

    def drop_fraction_at(self, step: int) -> float:
        """``f(step)``: ``drop_fraction`` annealed to 0 at ``stop * total_steps``."""
        end = self.stop * self.total_steps
        if step > end:
            return 0.0
        if self.anneal == "constant":
            return self.drop_fraction
        if self.anneal == "linear":
            return self.drop_fraction * (1.0 - step / end)
        return self.drop_fraction * 0.5 * (1.0 + math.cos(math.pi * step / end))

    def is_update_step(self, step: int) -> bool:
        return step % self.update_interval == 0 and 0 < step <= self.stop * self.total_steps

    @property
    def collects_gradients(self) -> bool:
        """Whether the next forward and backward collect the dense weight gradients (RigL, the
        step before an update). Module hooks collect them: the caller runs that step eagerly,
        not through a ``torch.compile``'d network, which would skip them."""
        return self._armed

    # ------------------------------------------------------------------ the loop
    def step(self) -> Optional[Dict]:
        """Counts one optimizer step; updates the masks on update steps.

        Returns the update's statistics on update steps, else ``None``.
        """
        self.step_count += 1
        record = self.update() if self.is_update_step(self.step_count) else None
        self._arm_if_next_updates()
        return record

    def update(self) -> Dict:
        """Drops and regrows blocks in every layer now. Returns the statistics it recorded."""
        step = self.step_count
        fraction = self.drop_fraction_at(step)
        grow = None if self._gradients_not_finite() else self.grow_scores()
        self._dense_grads.clear()
        self._grow_norms.clear()
        if grow is None:
            warnings.warn(f"step {step}: non-finite gradients, the mask update is skipped", RuntimeWarning)
            record = {"step": step, "drop_fraction": fraction, "skipped": "non-finite gradients", "dropped": {},
                      "moved": {}}
            self.history.append(record)
            return record
        updates = []
        # Resolved now, not at construction: a load_state_dict may have replaced the EMA's
        # shadow tensors (and the optimizer's state) since.
        shadows = _ema_shadows(self.model, self.ema)
        counts = [math.floor(fraction * module.nnz) for _, module in self.layers]
        self._warn_if_nothing_moves(step, fraction, counts)
        for (_, module), grow_scores, k in zip(self.layers, grow, counts):
            values = module.values
            zero = [values.data, *self._optimizer_states(values), *shadows.get(id(values), [])]
            drop_scores = values.detach().float().flatten(1).norm(dim=1)
            updates.append(sk.LayerUpdate(module.layout, drop_scores, grow_scores, k, zero))
        moved = sk.prune_and_regrow(updates, regrow_dropped=self.regrow_dropped).tolist()
        # With regrow_dropped, each layer drops min(k, nnz) and moves that many or fewer;
        # without, the op caps k at the growable dead blocks and drops what it moves.
        dropped = [min(k, module.nnz) for k, (_, module) in zip(counts, self.layers)] if self.regrow_dropped else moved
        for i, (_, module) in enumerate(self.layers):
            self.ever_live[i] |= module.layout.block_mask()
        record = {
            "step": step,
            "drop_fraction": fraction,
            "skipped": None,
            "dropped": {name: count for (name, _), count in zip(self.layers, dropped)},
            "moved": {name: count for (name, _), count in zip(self.layers, moved)},
            "itop_rate": self.itop_rate(),
        }
        self.history.append(record)
        return record

    def grow_scores(self) -> List[Tensor]:
        """Per layer ``[R, C]`` scores: the largest inactive blocks grow (live ones are ignored)."""
        raise NotImplementedError

    def _warn_if_nothing_moves(self, step: int, fraction: float, counts: List[int]) -> None:
        """Warns once when ``floor(f * nnz)`` is 0 in every layer while ``f > 0``: the update
        cannot move a block (layers with few live blocks, or a small drop fraction)."""
        if self._warned_k_zero or fraction <= 0 or any(counts):
            return
        self._warned_k_zero = True
        most = max(module.nnz for _, module in self.layers)
        warnings.warn(
            f"step {step}: {type(self).__name__} moves no block: floor({fraction:.3g} x live blocks) is 0 in every "
            f"layer (at most {most} live blocks per layer); use smaller blocks, a larger drop_fraction or a "
            "larger model", RuntimeWarning)

    def itop_rate(self) -> float:
        """In-time over-parameterisation: the fraction of all blocks that were ever live."""
        ever = sum(int(mask.sum()) for mask in self.ever_live)
        return ever / sum(mask.numel() for mask in self.ever_live)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict:
        return {
            "step": self.step_count,
            "generator": self.generator.get_state(),
            "history": list(self.history),
            "ever_live": [mask.cpu() for mask in self.ever_live],
            "config": self._config(),
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restores the step, the generator and the statistics. Load the model's state dict
        (which holds the masks) and the optimizer's too, for an exact resume. (A state saved by
        an older version is brought up to date by :mod:`sparse_diffusion.migrations` when its
        run is loaded.)"""
        saved = state.get("config")
        if saved != self._config():
            warnings.warn(f"resuming with another configuration: {saved} -> {self._config()}")
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        self.ever_live = [mask.to(m.values.device) for mask, (_, m) in zip(state["ever_live"], self.layers)]
        self.set_step(state["step"])

    def set_step(self, step: int) -> None:
        """Positions the schedule after ``step`` optimizer steps (and, for RigL, arms the
        dense-gradient collection if the next step updates the masks)."""
        self.step_count = step
        self._arm_if_next_updates()

    def _config(self) -> Dict:
        return {
            "algorithm": type(self).__name__, "total_steps": self.total_steps,
            "update_interval": self.update_interval, "drop_fraction": self.drop_fraction,
            "anneal": self.anneal, "stop": self.stop, "seed": self.seed, "regrow_dropped": self.regrow_dropped,
        }

    # ------------------------------------------------------------------ internals
    def _optimizer_states(self, values: Tensor) -> List[Tensor]:
        state = self.optimizer.state.get(values, {})
        return [t for t in state.values() if isinstance(t, Tensor) and t.shape == values.shape]

    def _gradients_not_finite(self) -> bool:
        grads = [m.values.grad for _, m in self.layers if m.values.grad is not None]
        grads += list(self._dense_grads.values()) + list(self._grow_norms.values())
        return any(not bool(torch.isfinite(g).all()) for g in grads)

    def _arm_if_next_updates(self) -> None:
        """Registers the dense-gradient collectors for the step before an update, and removes
        them after it: a forward hook costs every call of its module, so the other steps run
        without them."""
        self._armed = self.grows_by_gradient and self.is_update_step(self.step_count + 1)
        if self._armed and not self._hooks:
            self._hooks = [module.register_forward_hook(self._collector(i)) for i, (_, module) in enumerate(self.layers)]
            self._hooks += [module.values.register_post_accumulate_grad_hook(self._reducer(i))
                            for i, (_, module) in enumerate(self.layers)]
        elif not self._armed and self._hooks:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []

    def _collector(self, index: int):
        """A forward hook that, when armed, adds this call's dense weight gradient."""

        def hook(module: BlockSparseModule, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
            if not output.requires_grad:
                return
            x = inputs[0].detach()

            def accumulate(grad_out: Tensor) -> None:
                dense = module.dense_weight_grad(x, grad_out)
                if index in self._dense_grads:
                    self._dense_grads[index] += dense
                else:
                    self._dense_grads[index] = dense

            output.register_hook(accumulate)

        return hook

    def _reducer(self, index: int):
        """A hook run once this layer's gradient of a backward is complete: turns the dense
        gradient collected for it into block norms and frees it."""
        module = self.layers[index][1]

        def hook(values: Tensor) -> None:
            dense = self._dense_grads.pop(index, None)
            if dense is None:
                return
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(dense)
            norms = sk.block_norms(dense, module.block_size)
            del dense
            self._grow_norms[index] = norms + self._grow_norms[index] if index in self._grow_norms else norms

        return hook


def _ema_shadows(model: nn.Module, ema) -> Dict[int, List[Tensor]]:
    """``{id(values parameter): [its EMA shadow]}`` for the block-sparse layers."""
    if ema is None:
        return {}
    shadows = list(getattr(ema, "shadow_params", ema))
    params = list(model.parameters())
    if len(shadows) != len(params) or any(s.shape != p.shape for s, p in zip(shadows, params)):
        raise ValueError(
            "the EMA's shadow parameters do not line up with model.parameters(): create the EMA "
            "after sparsify(model, ...)"
        )
    values = {id(m.values) for m in model.modules() if isinstance(m, BlockSparseModule)}
    return {id(p): [s] for p, s in zip(params, shadows) if id(p) in values}


class Static(DynamicSparsity):
    """Static-DM: the mask chosen at initialisation never changes (``step()`` only counts)."""

    updates_masks = False

    def is_update_step(self, step: int) -> bool:
        return False


class RigL(DynamicSparsity):
    """RigL-DM: grows the inactive blocks with the largest dense-gradient norm."""

    grows_by_gradient = True

    def grow_scores(self) -> List[Tensor]:
        if len(self._grow_norms) != len(self.layers):
            missing = [name for i, (name, _) in enumerate(self.layers) if i not in self._grow_norms]
            raise RuntimeError(
                f"step {self.step_count}: no dense gradient was collected for {missing[:3]}...: call algo.step() "
                "once per iteration after optimizer.step(), with a forward and backward in between"
            )
        return [self._grow_norms[i] for i in range(len(self.layers))]


class MagRan(DynamicSparsity):
    """MagRan-DM (SET): grows inactive blocks uniformly at random."""

    def grow_scores(self) -> List[Tensor]:
        return [
            torch.rand(module.grid, generator=self.generator).to(module.values.device) for _, module in self.layers
        ]


def assert_masks_synced(model: nn.Module) -> None:
    """Raises ``AssertionError`` naming the first layer whose mask differs between ranks (a
    no-op outside ``torch.distributed``). One small all-gather of per-layer hashes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = _layer_fingerprints(model)
    everyone: List[Optional[List[Tuple[str, str]]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if theirs == mine:
            continue
        for (name, digest), (other_name, other_digest) in zip(mine, theirs):
            if (name, digest) != (other_name, other_digest):
                raise AssertionError(f"masks differ across ranks: layer {name} on rank {dist.get_rank()} is not "
                                     f"the same as {other_name} on rank {rank}")
        raise AssertionError(f"masks differ across ranks: rank {dist.get_rank()} has {len(mine)} block-sparse "
                             f"layers, rank {rank} has {len(theirs)}")


def _layer_fingerprints(model: nn.Module) -> List[Tuple[str, str]]:
    """``(name, hash of its (row, col) per slot)`` of every block-sparse layer."""
    import hashlib

    return [
        (name, hashlib.sha256(module.row_idx.cpu().numpy().tobytes() + module.col_idx.cpu().numpy().tobytes())
         .hexdigest())
        for name, module in model.named_modules() if isinstance(module, BlockSparseModule)
    ]


def mask_fingerprint(model: nn.Module) -> str:
    """A hash of every block-sparse layer's ``(row, col)`` per slot."""
    import hashlib

    digest = hashlib.sha256()
    for name, module in model.named_modules():
        if isinstance(module, BlockSparseModule):
            digest.update(name.encode())
            digest.update(module.row_idx.cpu().numpy().tobytes())
            digest.update(module.col_idx.cpu().numpy().tobytes())
    return digest.hexdigest()
