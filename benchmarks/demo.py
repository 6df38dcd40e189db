"""``make demo``: build a block-sparse layer, check it against dense, time it here.

Prints the backend in use, the largest deviation from the masked dense layer (forward
and gradients) and forward+backward times of dense, masked dense and block-sparse.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import sparse_kernels as sk

from .common import environment, forward_backward, measure_ms


def interpreter_check() -> None:
    """Runs the Triton kernels under the interpreter at a small shape against masked dense.

    Only meaningful in a process started with ``TRITON_INTERPRET=1`` (see ``main``).
    """
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 64)
    layer = sk.BlockSparseLinear.from_dense(dense, block_size=(16, 32), density=0.5)
    mask = layer.layout.block_mask().repeat_interleave(16, 0).repeat_interleave(32, 1)
    x = torch.randn(5, 7, 96, requires_grad=True)
    (sparse_dx,) = torch.autograd.grad(layer(x).sum(), x)
    (masked_dx,) = torch.autograd.grad(F.linear(x, dense.weight * mask, dense.bias).sum(), x)
    error = max((layer(x) - F.linear(x, dense.weight * mask, dense.bias)).abs().max().item(),
                (sparse_dx - masked_dx).abs().max().item())
    print(f"Triton kernels under the interpreter (x [5, 7, 96], block 16x32, density 0.5, "
          f"backend {sk.select_backend(x.device, x.dtype, (16, 32))}): max |err| vs masked dense {error:.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--interpreter-check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    args = parser.parse_args(argv)
    if args.interpreter_check:
        return interpreter_check()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    backend = sk.select_backend(device, dtype, (args.block_size, args.block_size))
    print(f"device: {env['device_name']}; torch {env['torch']}, triton {env['triton']}; "
          f"{str(dtype).replace('torch.', '')}; backend: {backend}")
    torch.manual_seed(0)
    dense = torch.nn.Linear(args.features, args.features, device=device, dtype=dtype)
    x = torch.randn(args.tokens, args.features, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(args.tokens, args.features, device=device, dtype=dtype)

    print(f"\nx [{args.tokens}, {args.features}] -> W [{args.features}, {args.features}], "
          f"block {args.block_size}, forward+backward")
    print(f"{'density':>8} {'max |err|':>10} {'dense ms':>9} {'masked ms':>10} {'sparse ms':>10} {'sparse/dense':>13}")
    for density in args.densities:
        layer = sk.BlockSparseLinear.from_dense(dense, block_size=args.block_size, density=density)
        mask = layer.layout.block_mask().repeat_interleave(args.block_size, 0).repeat_interleave(args.block_size, 1)
        masked_weight = (dense.weight.detach() * mask).requires_grad_()

        def masked():
            return F.linear(x, masked_weight * mask, dense.bias)

        sparse_grads = forward_backward(lambda: layer(x), (x, layer.values, layer.bias), grad_y)()
        masked_grads = forward_backward(masked, (x, masked_weight, dense.bias), grad_y)()
        errors = [
            (layer(x) - masked()).abs().max(),
            (sparse_grads[0] - masked_grads[0]).abs().max(),
            (sparse_grads[1] - sk.from_dense(masked_grads[1], layer.layout)).abs().max(),
            (sparse_grads[2] - masked_grads[2]).abs().max(),
        ]
        error = max(e.item() for e in errors)
        # Dense is timed again in every row, beside the others, so each ratio is side by side.
        dense_ms = measure_ms(forward_backward(lambda: dense(x), (x, dense.weight, dense.bias), grad_y), device)
        masked_ms = measure_ms(forward_backward(masked, (x, masked_weight, dense.bias), grad_y), device)
        sparse_ms = measure_ms(forward_backward(lambda: layer(x), (x, layer.values, layer.bias), grad_y), device)
        print(f"{density:>8.2f} {error:>10.2e} {dense_ms:>9.1f} {masked_ms:>10.1f} {sparse_ms:>10.1f} "
              f"{sparse_ms / dense_ms:>12.2f}x")
    if device.type == "cpu":
        env_vars = {**os.environ, "TRITON_INTERPRET": "1", "SPARSE_KERNELS_BACKEND": "triton"}
        print()
        subprocess.run([sys.executable, "-m", "benchmarks.demo", "--interpreter-check"], env=env_vars, check=True)
    if backend == "reference":
        print("\nThe reference path scatters live blocks into a dense weight and runs dense torch ops,\n"
              "so it costs what dense costs; the compiled (CPU) and Triton (GPU) kernels skip dead blocks.")


if __name__ == "__main__":
    main()
