"""Models leave the project: the sparse form of a diffusers model on disk, and the export of a run.

:func:`save_pretrained` / :func:`load_pretrained` keep a sparsified diffusers model sparse on
disk. The folder (``SPARSE_FORMAT``) holds:

* ``config.json``: the model's diffusers config (``model.save_config``);
* ``block_sparse_model.safetensors``: the whole ``state_dict`` (block-sparse layers as their
  ``values [nnz, bo, bi, ...]`` and their masks as ``row_idx`` / ``col_idx``), under a name plain
  diffusers does not look for, so ``from_pretrained`` of the folder fails with diffusers' own
  "no file named ..." instead of loading freshly initialised weights;
* ``block_sparse_layers.json``: one entry per block-sparse layer (module path, kind, block
  size, masked_dense flag, live blocks) and the model's memory format.

Nothing is read with pickle: JSON and safetensors only, and the model class is looked up among
diffusers' model classes by the ``_class_name`` of ``config.json``, never imported by name.

:func:`export_run` writes a trained pixel or latent run as a diffusers folder (``unet/``,
``scheduler/``, ``vae/``, ``README.md``): the EMA weights, densified so that plain diffusers
loads them (or in the sparse form above with ``sparse=True``).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Union

import torch
from torch import nn

import sparse_kernels as sk

from .io import atomic_write_folder, one_line
from .sparsify import densify, parent_module, refuse_diffusers_save

if TYPE_CHECKING:  # importing the training layer here would make `import sparse_diffusion` heavy
    from .run import LoadedRun

SPARSE_FORMAT = "sparse_diffusion.block_sparse"
SPARSE_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "block_sparse_model.safetensors"
LAYERS_NAME = "block_sparse_layers.json"
_KINDS = {
    "BlockSparseLinear": (sk.BlockSparseLinear, nn.Linear),
    "BlockSparseConv2d": (sk.BlockSparseConv2d, nn.Conv2d),
}
# The file names diffusers' from_pretrained loads weights from: a sparse folder must not hold them.
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin",
                      "diffusion_pytorch_model*.index.json")

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- sparse form
def save_pretrained(model: nn.Module, directory: PathLike) -> Path:
    """Writes ``model`` (a diffusers ``ModelMixin``, block-sparse or not) to ``directory`` in the
    sparse form (see the module's docstring); returns the folder. :func:`load_pretrained` reads it.

    Refuses (``ValueError``) a folder that already holds diffusers weights, which plain
    ``from_pretrained`` would load instead of this model.
    """
    from diffusers import ModelMixin
    from safetensors.torch import save_file

    if not isinstance(model, ModelMixin):
        raise TypeError(f"save_pretrained expects a diffusers model (ModelMixin), got {type(model).__name__}")
    folder = Path(directory)
    if folder.is_file():
        raise ValueError(f"{folder} is a file; save_pretrained writes a folder")
    folder.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for pattern in _DIFFUSERS_WEIGHTS for p in folder.glob(pattern))
    if stale:
        raise ValueError(f"{folder} already holds diffusers weights ({', '.join(stale)}): choose an empty folder")

    layers = [
        {"name": name, "kind": type(m).__name__, "block_size": list(m.block_size),
         "masked_dense": bool(m.masked_dense), "live_blocks": m.nnz}
        for name, m in model.named_modules() if isinstance(m, sk.BlockSparseModule)
    ]
    unknown = sorted({layer["kind"] for layer in layers} - set(_KINDS))
    if unknown:
        raise TypeError(f"save_pretrained knows BlockSparseLinear and BlockSparseConv2d, got {', '.join(unknown)}")
    model.save_config(folder)
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    description = {
        "format": SPARSE_FORMAT,
        "version": SPARSE_FORMAT_VERSION,
        "class_name": type(model).__name__,
        "memory_format": "channels_last" if _is_channels_last(model) else "contiguous",
        "layers": layers,
    }
    (folder / LAYERS_NAME).write_text(json.dumps(description, indent=2) + "\n")
    return folder


def load_pretrained(directory: PathLike, subfolder: Optional[str] = None) -> nn.Module:
    """The model :func:`save_pretrained` wrote to ``directory`` (``/ subfolder``), exactly: same
    masks, same values, same memory format, on the CPU, in eval mode (as diffusers'
    ``from_pretrained`` returns). A file that is not valid raises a one-line ``ValueError``
    naming it; a missing one ``FileNotFoundError``.
    """
    folder = Path(directory) / subfolder if subfolder else Path(directory)
    config_path, layers_path, weights_path = folder / CONFIG_NAME, folder / LAYERS_NAME, folder / WEIGHTS_NAME
    config = _read_json(config_path)
    model_class = _model_class(config.get("_class_name"), config_path)
    layers, memory_format = _read_layers(layers_path, model_class.__name__)
    state = _read_safetensors(weights_path)

    try:
        model = model_class.from_config(config)
    except Exception as error:  # whatever a bad value makes the constructor raise
        raise ValueError(f"{config_path}: cannot build a {model_class.__name__} from it: {one_line(error)}") from None
    floating = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floating) == 1 and floating != {t.dtype for t in model.state_dict().values() if t.is_floating_point()}:
        model.to(floating.pop())
    for layer in layers:
        _swap_in_sparse(model, layer, state, layers_path, weights_path)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{weights_path} does not fit the model of {config_path}: {one_line(error)}") from None
    if memory_format == "channels_last":
        from .channels_last import channels_last

        channels_last(model)
    refuse_diffusers_save(model)
    return model.eval()


def _is_channels_last(model: nn.Module) -> bool:
    """Whether ``model``'s convolutions are channels-last (a 1x1 kernel is both, and does not tell)."""
    for module in model.modules():
        if isinstance(module, sk.BlockSparseConv2d) and module.channels_last:
            return True
        if isinstance(module, nn.Conv2d) and not module.weight.is_contiguous():
            return module.weight.is_contiguous(memory_format=torch.channels_last)
    return False


def _read_json(path: Path) -> Dict:
    """The JSON object in ``path``; a one-line ``ValueError`` naming it if it is not one."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a folder written by sparse_diffusion.save_pretrained")
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a valid JSON file ({type(error).__name__}: {one_line(error)})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} is not a valid file: a JSON object was expected, got {type(document).__name__}")
    return document


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (no pickle); a one-line ``ValueError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a folder written by sparse_diffusion.save_pretrained")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is not a valid safetensors file ({one_line(error)})") from None


def _model_class(name, config_path: Path):
    """The diffusers model class called ``name`` (never any other class, never an import by name)."""
    import diffusers

    model_class = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(model_class, type) and issubclass(model_class, diffusers.ModelMixin)):
        raise ValueError(f"{config_path}: _class_name {name!r} is not a diffusers model class")
    return model_class


def _read_layers(path: Path, class_name: str):
    """``(layers, memory_format)`` of a ``block_sparse_layers.json`` written for a ``class_name``, validated."""
    document = _read_json(path)
    if document.get("format") != SPARSE_FORMAT or document.get("version") != SPARSE_FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a valid file: format {document.get('format')!r} version {document.get('version')!r}, "
            f"expected {SPARSE_FORMAT!r} version {SPARSE_FORMAT_VERSION}"
        )
    if document.get("class_name") != class_name:
        raise ValueError(f"{path} describes a {document.get('class_name')!r}, but {CONFIG_NAME} a {class_name!r}")
    layers, memory_format = document.get("layers"), document.get("memory_format")
    if memory_format not in ("contiguous", "channels_last") or not isinstance(layers, list):
        raise ValueError(f"{path} is not a valid file: 'layers' must be a list and 'memory_format' "
                         f"contiguous or channels_last")
    for index, layer in enumerate(layers):
        block = layer.get("block_size") if isinstance(layer, dict) else None
        if not (
            isinstance(layer, dict) and isinstance(layer.get("name"), str) and layer.get("kind") in _KINDS
            and isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
            and isinstance(layer.get("masked_dense"), bool)
        ):
            raise ValueError(f"{path} is not a valid file: layer {index} is not "
                             f"{{name, kind, block_size [bo, bi], masked_dense}}: {json.dumps(layer)[:200]}")
    return layers, memory_format


def _swap_in_sparse(model: nn.Module, layer: Dict, state: Dict[str, torch.Tensor], layers_path: Path,
                    weights_path: Path) -> None:
    """Replaces the dense layer ``layer["name"]`` of a freshly built model by the block-sparse one
    with the mask stored in ``state`` (its values are loaded afterwards, with the rest)."""
    name, (sparse_class, dense_class) = layer["name"], _KINDS[layer["kind"]]
    try:
        dense = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{layers_path}: the model has no layer {name!r}") from None
    if type(dense) is not dense_class:
        raise ValueError(f"{layers_path}: layer {name!r} is a {type(dense).__name__}, not a {dense_class.__name__}")
    rows, cols = state.get(f"{name}.row_idx"), state.get(f"{name}.col_idx")
    if rows is None or cols is None:
        raise ValueError(f"{weights_path} lacks the mask of layer {name!r} ({name}.row_idx / {name}.col_idx)")
    block = tuple(layer["block_size"])
    features = tuple(dense.weight.shape[:2])
    if features[0] % block[0] or features[1] % block[1]:
        raise ValueError(f"{layers_path}: block size {block} does not divide the features {features} of layer {name!r}")
    if layer.get("live_blocks", rows.shape[0]) != rows.shape[0]:
        raise ValueError(f"{weights_path}: layer {name!r} has {rows.shape[0]} live blocks, {layers_path.name} says "
                         f"{layer['live_blocks']}")
    grid = (features[0] // block[0], features[1] // block[1])
    try:
        layout = sk.BlockSparseLayout.from_indices(rows, cols, grid, block)
        sparse = sparse_class.from_dense(dense, block_size=block, block_mask=layout.block_mask())
    except (ValueError, TypeError, RuntimeError, IndexError) as error:
        raise ValueError(f"{weights_path}: the mask of layer {name!r} does not fit it: {one_line(error)}") from None
    sparse.masked_dense = layer["masked_dense"]
    parent, child = parent_module(model, name)
    setattr(parent, child, sparse)


# --------------------------------------------------------------------------- export of a run
def export_run(loaded: "LoadedRun", out: PathLike, sparse: bool = False) -> Path:
    """Writes a trained run (``loaded``: :func:`sparse_diffusion.run.load_run`) as a diffusers folder.

    ``out`` holds ``unet/`` (the EMA weights, densified: dead blocks are zeros, and
    ``UNet2DModel.from_pretrained(out, subfolder="unet")`` loads it with plain diffusers; with
    ``sparse=True`` the sparse form of :func:`save_pretrained` instead), ``scheduler/`` (the
    training ``DDPMScheduler``), ``vae/`` for latent runs and a ``README.md`` model card. The
    run's model is left untouched. The folder is written beside ``out`` and renamed into place
    at the end, so a failure leaves no half folder; ``out`` must not exist or be empty.
    Returns ``out``.
    """
    from diffusers import ModelMixin

    state, config = loaded.state, loaded.run.config
    if config.model not in ("pixel", "ldm") or not isinstance(state.denoiser, ModelMixin):
        raise ValueError(f"export supports pixel and ldm runs (diffusers UNets); this is a {config.model} run")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(staging: Path) -> None:
        model = ema_copy(state.denoiser, state.ema)
        if sparse:
            save_pretrained(model, staging / "unet")
        else:
            densify(model).save_pretrained(staging / "unet", safe_serialization=True)
        state.task.scheduler.save_pretrained(staging / "scheduler")
        autoencoder = getattr(state.task, "autoencoder", None)
        if autoencoder is not None:
            autoencoder.save_pretrained(staging / "vae", safe_serialization=True)
        (staging / "README.md").write_text(model_card(loaded, out.name, sparse))

    atomic_write_folder(write, out)
    return out


def ema_copy(model: nn.Module, ema) -> nn.Module:
    """A deep copy of ``model`` holding the weights of its EMA (a diffusers ``EMAModel``), in
    eval mode (``model`` is not touched)."""
    model = copy.deepcopy(model)
    parameters = list(model.parameters())
    shadow = ema.shadow_params
    if len(shadow) != len(parameters) or any(s.shape != p.shape for s, p in zip(shadow, parameters)):
        raise ValueError(f"the EMA holds {len(shadow)} tensors that do not match the model's {len(parameters)} "
                         "parameters")
    ema.copy_to(parameters)
    return model.eval()


# --------------------------------------------------------------------------- model card
_METHODS = {
    "dense": "dense training (no sparsity)",
    "static": "Static-DM: a fixed random block mask, trained sparse from scratch",
    "rigl": "RigL-DM: sparse from scratch, blocks dropped by magnitude and regrown by gradient",
    "magran": "MagRan-DM: sparse from scratch, blocks dropped by magnitude and regrown at random",
}


def model_card(loaded: "LoadedRun", name: str, sparse: bool = False) -> str:
    """The ``README.md`` of an exported run: what was trained, how well, and how to load it."""
    state, config = loaded.state, loaded.run.config
    report, denoiser = state.report, state.denoiser
    unet = denoiser.config
    settings = [
        ("model", f"{type(denoiser).__name__} ({config.model}, preset {config.preset})"),
        ("method", config.method),
        ("sparsity", f"{report.global_sparsity:.4f} over {len(report.sparse_layers)} block-sparse layers "
                     f"({config.distribution})" if report else "0 (dense)"),
        ("block size", "x".join(map(str, report.block_size)) if report else "-"),
        ("steps", state.step),
        ("dataset", config.dataset),
        ("prediction type", state.task.scheduler.config.prediction_type),
        ("sample size", f"{unet.in_channels}x{unet.sample_size}x{unet.sample_size}"),
        ("class-conditional", f"{unet.num_class_embeds} classes" if unet.get("num_class_embeds") else "no"),
        ("batch size", config.batch_size),
        ("precision", config.precision),
        ("EMA decay", config.ema_decay),
    ]
    weights = ("in block-sparse form (sparse_diffusion.save_pretrained); sparse_diffusion.load_pretrained reads them"
               if sparse else "densified (zeros at the dead blocks), which plain diffusers loads")
    method = _METHODS.get(config.method, config.method)
    lines = [
        "---", "library_name: diffusers", "tags:", "- diffusion", "- sparse-training", f"- {config.method}", "---", "",
        f"# {name}", "",
        f"A {type(denoiser).__name__} trained with sparse_diffusion ({method}) on {config.dataset}. "
        f"`unet/` holds its EMA weights, {weights}.", "",
        "| setting | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in settings], "",
    ]
    lines += _metrics_section(loaded.run.metrics_path)
    lines += ["## How to load", "", "```python", *_loading_code(state, name, sparse), "```", ""]
    return "\n".join(lines)


def _metrics_section(path: Path) -> List[str]:
    if not path.is_file():
        return []
    try:
        metrics = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return ["## Metrics", "", f"(the run's {path.name} could not be read)", ""]
    if not isinstance(metrics, dict):
        return []
    rows = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    rows.update({k: v for k, v in (metrics.get("metrics") or {}).items() if not isinstance(v, (dict, list))})
    return ["## Metrics", "", "| quantity | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows.items()], ""]


def _loading_code(state, name: str, sparse: bool) -> List[str]:
    unet = state.denoiser.config
    conditional = bool(unet.get("num_class_embeds"))
    latent = getattr(state.task, "autoencoder", None) is not None
    cls = type(state.denoiser).__name__
    lines = ["import torch", f"from diffusers import {'AutoencoderKL, ' if latent else ''}DDIMScheduler"
             + ("" if sparse else f", {cls}")]
    if sparse:
        lines += ["import sparse_diffusion as sd", "", f'unet = sd.load_pretrained("{name}", subfolder="unet")']
    else:
        lines += ["", f'unet = {cls}.from_pretrained("{name}", subfolder="unet").eval()']
    lines += [
        f'scheduler = DDIMScheduler.from_pretrained("{name}", subfolder="scheduler")',
        "scheduler.set_timesteps(50)",
        f"x = torch.randn(8, {unet.in_channels}, {unet.sample_size}, {unet.sample_size})",
    ]
    if conditional:
        lines.append(f"labels = torch.arange(8) % {unet.num_class_embeds}  # one class per sample")
    lines += [
        "with torch.no_grad():",
        "    for t in scheduler.timesteps:",
        f"        prediction = unet(x, t.expand(8){', class_labels=labels' if conditional else ''}).sample",
        "        x = scheduler.step(prediction, t, x).prev_sample",
    ]
    if latent:
        lines += [
            f'    vae = AutoencoderKL.from_pretrained("{name}", subfolder="vae")',
            "    x = vae.decode(x / vae.config.scaling_factor).sample",
        ]
    lines.append("images = x.clamp(-1, 1)  # [8, C, H, W] in [-1, 1]")
    return lines


__all__ = ["export_run", "load_pretrained", "save_pretrained"]
