"""Every block-sparse layer of a model: our kernels against dense kernels on the masked weight.

    python -m benchmarks.layers --out-dir benchmarks/results               # demo and small, 50/75/90%
    python -m benchmarks.layers --models demo --sparsities 0.5
    python -m benchmarks.layers --block-sizes 16 16x1                       # block shapes side by side

For each model, sparsity and block shape, one training step of the sparsified model (ERK,
channels-last) records every block-sparse layer's input and output gradient; then, on those
very tensors, it times forward, grad-input and grad-weight of the block-sparse ops, and the
dense ops on the masked weight (``F.conv2d`` / ``F.linear`` and their backward, oneDNN/MKL,
channels-last weight): what :attr:`sparse_kernels.BlockSparseModule.masked_dense` would run.
``ratio`` is sparse time / masked-dense time, and ``efficiency`` the dense time per MAC over ours
(``density * dense / sparse``). These rows set ``sparse_diffusion.sparsify.MASKED_DENSE_FROM``.
Block shapes are measured layer by layer in turn (interleaved), and ``per_mac`` sums each
(model, sparsity, block shape, product) over the layers: ``sparse_per_dense_mac`` is our time
over the masked-dense time scaled by the density (1.0 = as fast per live MAC as dense), so that
two block shapes compare per MAC at their own densities.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

import sparse_kernels as sk

from sparse_diffusion.config import block_pair, block_shape

from .common import add_output_arguments, environment, parameters_of, print_table, result_path, write_json
from .summary import time_per_live_mac
from .train_loop import MODELS


def _ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


PRODUCTS = ("fwd", "grad_input", "grad_weight")


def capture(model: str, sparsity: float, block, args: argparse.Namespace):
    """A sparsified denoiser (every sparse layer on the block-sparse kernels) and, per layer,
    the input and output gradient of one training step."""
    import sparse_diffusion as sd
    from sparse_diffusion.channels_last import channels_last
    from sparse_diffusion.distributed import RankRandom
    from sparse_diffusion.tasks import build_task, draw_batch
    from sparse_diffusion.train import TrainConfig

    torch.manual_seed(0)
    config = TrainConfig(**MODELS[model], batch_size=args.batch_size, block_size=block)
    task, dataset = build_task(config, torch.device("cpu"))
    sd.sparsify(task.denoiser, sparsity, block_size=block_pair(block), masked_dense=False)
    if config.model != "chirodiff":
        channels_last(task)
    tensors: Dict[str, Dict[str, torch.Tensor]] = {}

    def hook(name):
        def record(module, inputs, output):
            tensors[name] = {"x": inputs[0].detach()}
            output.register_hook(lambda grad: tensors[name].__setitem__("grad", grad.detach()))
        return record

    layers = {name: m for name, m in task.denoiser.named_modules() if isinstance(m, sk.BlockSparseModule)}
    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    random = RankRandom(torch.Generator().manual_seed(0))
    task.loss(draw_batch(dataset, config.batch_size, random, torch.device("cpu")), random).backward()
    for handle in handles:
        handle.remove()
    return layers, tensors


def measure_layer(module, x, grad, repeats: int) -> Dict[str, float]:
    ops = sk.registry.ops()
    values, index = module.values.detach(), module._index()
    dense = module.to_dense().detach()
    if isinstance(module, sk.BlockSparseConv2d):
        conv = (list(module.stride), list(module._explicit_padding()), list(module.dilation))
        dense = dense.contiguous(memory_format=torch.channels_last)
        ours = (
            lambda: ops.bsr_conv2d(x, values, None, *index, *conv, True),
            lambda: ops.bsr_conv2d_grad_input(grad, values, *index, list(x.shape[2:]), *conv),
            lambda: ops.bsr_conv2d_grad_weight(grad, x, *index, list(values.shape[1:]), *conv),
        )

        def backward(mask):
            return lambda: torch.ops.aten.convolution_backward(grad, x, dense, None, *conv, False, [0, 0], 1, mask)

        theirs = (lambda: F.conv2d(x, dense, None, *conv), backward([True, False, False]), backward([False, True, False]))
    else:
        x2, grad2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        ours = (
            lambda: ops.bsr_linear(x, values, None, *index),
            lambda: ops.bsr_linear_grad_input(grad, values, *index),
            lambda: ops.bsr_linear_grad_weight(grad, x, *index, *values.shape[1:3]),
        )
        theirs = (lambda: F.linear(x, dense), lambda: grad @ dense, lambda: grad2.T @ x2)
    row = {}
    for name, (mine, other) in zip(PRODUCTS, zip(ours, theirs)):
        row[f"sparse_{name}_ms"] = _ms(mine, repeats)
        row[f"dense_{name}_ms"] = _ms(other, repeats)
    row["sparse_ms"] = sum(row[f"sparse_{n}_ms"] for n in PRODUCTS)
    row["dense_ms"] = sum(row[f"dense_{n}_ms"] for n in PRODUCTS)
    return row


def per_mac(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per (model, sparsity, block shape): each product's time over the layers per live MAC,
    relative to the masked-dense time per MAC (sum of ours / sum of density x dense)."""
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["sparsity"], row["block_size"]), []).append(row)
    summary = []
    for (model, sparsity, block), members in groups.items():
        entry = {"model": model, "sparsity": sparsity, "block_size": block, "layers": len(members)}
        for product in PRODUCTS + ("",):
            entry[f"sparse_per_dense_mac{'_' + product if product else ''}"] = time_per_live_mac(members, product)
        summary.append(entry)
    return summary


def run(args: argparse.Namespace) -> Dict[str, object]:
    torch.set_num_threads(args.threads)
    rows: List[Dict[str, object]] = []
    for model in args.models:
        for sparsity in args.sparsities:
            captured = {block: capture(model, sparsity, block, args) for block in args.block_sizes}
            names = list(dict.fromkeys(name for layers, _ in captured.values() for name in layers))
            for name in names:  # the block shapes in turn, layer by layer
                for block, (layers, tensors) in captured.items():
                    if name not in layers:
                        continue
                    module, x, grad = layers[name], tensors[name]["x"], tensors[name]["grad"]
                    row = {"model": model, "sparsity": sparsity, "block_size": block, "layer": name,
                           "kind": type(module).__name__, "x": list(x.shape), "out": module.layout.shape[0],
                           "density": module.density, "stride": list(getattr(module, "stride", (1, 1))),
                           "kernel": list(getattr(module, "kernel_size", (1, 1)))}
                    row.update(measure_layer(module, x, grad, args.repeats))
                    row["ratio"] = row["sparse_ms"] / row["dense_ms"]
                    row["efficiency"] = module.density * row["dense_ms"] / row["sparse_ms"]
                    rows.append(row)
            print(f"  {model} at {sparsity}: {len(names)} layers", flush=True)
    params = parameters_of(args)
    return {"suite": "layers", "environment": environment(torch.device("cpu")), "parameters": params, "rows": rows,
            "per_mac": per_mac(rows)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["demo", "small", "chirodiff"], default=["demo", "small"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-sizes", "--block-size", nargs="+", type=block_shape, default=[16],
                        help="block shapes, measured in turn: N (N x N) or BOxBI such as 16x1")
    parser.add_argument("--repeats", type=int, default=5)
    add_output_arguments(parser, threads=True)
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    payload = run(args)
    print_table(payload["rows"], ["model", "sparsity", "block_size", "layer", "x", "out", "stride", "density",
                                  "sparse_ms", "dense_ms", "ratio", "efficiency"])
    print_table(payload["per_mac"], ["model", "sparsity", "block_size", "layers"] +
                [f"sparse_per_dense_mac_{p}" for p in PRODUCTS] + ["sparse_per_dense_mac"])
    write_json(result_path(args.out, args.out_dir, "layers", payload["environment"]), payload)
    return payload


if __name__ == "__main__":
    main()
