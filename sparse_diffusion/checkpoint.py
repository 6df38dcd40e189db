"""Checkpoints that load without running code: tensors in safetensors, the rest in JSON.

A training state is a nest of dicts, lists and tuples whose leaves are tensors, numbers,
strings, booleans and ``None`` (a model's, an optimizer's, an EMA's and an algorithm's
``state_dict``). :func:`save_state` stores its tensors in one ``.safetensors`` file and the nest
around them as JSON in that file's metadata, so one atomic rename replaces the whole
checkpoint; :func:`load_state` reads it back bit for bit. No pickle is involved, so a file
handed over by someone else can be wrong, but cannot run code.

Errors a user can meet are one line naming the file: :class:`CheckpointError` (truncated,
corrupted, not a checkpoint, an old pickle checkpoint) and :class:`~.io.DiskFullError`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from .io import DiskFullError, atomic_write

__all__ = ["CheckpointError", "DiskFullError", "load_state", "non_finite_tensors", "save_state"]

FORMAT = "sparse-diffusion-checkpoint"
VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, not a checkpoint, or refused."""


# --------------------------------------------------------------------------- encoding
def _encode(value: Any, tensors: Dict[str, torch.Tensor], path: str) -> Any:
    """``value`` as JSON, with each tensor moved to ``tensors`` under its path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach()
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.key{i}"), _encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} at {path} in a checkpoint (tensors, numbers, "
                    "strings, lists, tuples and dicts only)")


def _decode(value: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__items__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _storable(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory (what safetensors takes)."""
    seen = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.contiguous().cpu()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if key is not None and (key in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()):
            tensor = tensor.clone()
        if key is not None:
            seen.add(key)
        out[name] = tensor
    return out


# --------------------------------------------------------------------------- files
def save_state(state: Dict[str, Any], path: Path) -> None:
    """Writes ``state`` (a nest of dicts, lists, tuples, tensors and JSON scalars) to ``path``
    as one safetensors file, atomically."""
    from safetensors.torch import save

    tensors: Dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "state")
    metadata = {"format": FORMAT, "version": str(VERSION), "structure": json.dumps(structure)}
    atomic_write(save(_storable(tensors), metadata=metadata), path)


def load_state(path: Path, device: torch.device = torch.device("cpu")) -> Dict[str, Any]:
    """The state :func:`save_state` wrote to ``path``, tensors on ``device``.

    Raises :class:`CheckpointError` (one line naming the file) for anything else: a missing,
    empty, truncated or corrupted file, a safetensors file that is not a checkpoint of this
    project, or an older pickle checkpoint (which is never unpickled).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"there is no checkpoint at {path}")
    if _is_zip_or_pickle(path):
        raise CheckpointError(
            f"{path} is a pickle (torch.save) file, as older versions of sparse-diffusion wrote; this version "
            "never unpickles a file, because unpickling can run code: retrain the run, or sample it with the "
            "version that wrote it")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{path} is a safetensors file but not a sparse-diffusion checkpoint")
            if metadata.get("version") != str(VERSION):
                raise CheckpointError(f"{path} is checkpoint version {metadata.get('version')}; "
                                      f"this version reads {VERSION}")
            tensors = {name: handle.get_tensor(name).to(device) for name in handle.keys()}
        structure = json.loads(metadata["structure"])
        return _decode(structure, tensors)
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"cannot read the checkpoint {path} (truncated or corrupted?): {reason}") from None


def _is_zip_or_pickle(path: Path) -> bool:
    """Whether ``path`` starts like a torch.save file (a zip archive, or a bare pickle)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    return head == b"PK" or (len(head) == 2 and head[0] == 0x80 and head[1] <= 5)


def non_finite_tensors(state: Any, prefix: str = "") -> List[str]:
    """The paths of the floating-point tensors in ``state`` that hold a NaN or an infinity."""
    found: List[str] = []
    items: List[Tuple[str, Any]]
    if isinstance(state, dict):
        items = [(f"{prefix}{k}", v) for k, v in state.items()]
    elif isinstance(state, (list, tuple)):
        items = [(f"{prefix}{i}", v) for i, v in enumerate(state)]
    elif isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    else:
        return []
    for name, value in items:
        found += non_finite_tensors(value, f"{name}." if not isinstance(value, torch.Tensor) else name)
    return found
