"""Compiles the Triton kernels ahead of time for Hopper (sm_90) and Ampere (sm_80), no GPU needed.

Run by tests/test_triton_compile.py in a process without TRITON_INTERPRET (interpreted
kernels cannot be compiled). Catches what the interpreter cannot: code that does not lower
to GPU code, configs whose shared memory fits no card, 16-bit dots that miss tensor cores.
Exit 0: all good; 1: a failure (printed); 3: this Triton's compile API is not the one known.
"""
import concurrent.futures
import os
import sys

assert "TRITON_INTERPRET" not in os.environ, "run without TRITON_INTERPRET"

import triton  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as error:  # pragma: no cover - other Triton versions
    print(f"unknown Triton compile API ({triton.__version__}): {error}")
    sys.exit(3)

import sparse_kernels.triton.conv2d as conv2d_kernels  # noqa: E402
import sparse_kernels.triton.linear as kernels  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}  # bytes per block on A100 / H100
POINTERS = ("a_ptr", "src_ptr", "values_ptr", "bias_ptr", "out_ptr", "dy_ptr", "x_ptr")
FP32_POINTERS = ("partial_ptr",)
INDEX_POINTERS = ("block_ptr_ptr", "block_slots_ptr", "slot_block_idx_ptr", "row_slots_ptr", "row_idx_ptr", "col_idx_ptr")
# Unit strides as launches specialise them: linear operands are row-major, conv operands
# channels-last (their names differ per kernel, so each kernel lists its own).
UNIT_STRIDES = {
    "_bsr_dsd_kernel": ("stride_ak", "stride_on"),
    "_bsr_sdd_kernel": ("stride_dyn", "stride_xk", "stride_oi"),
    "_bsr_conv2d_dsd_kernel": ("stride_sc", "stride_oc"),
    "_bsr_conv2d_sdd_kernel": ("stride_dyc", "stride_xc", "stride_pi"),
}


def compile_kernel(kernel, dtype, constexprs, config, capability):
    """Compiles ``kernel`` (an autotuner) as a launch with aligned, row-major tensors would."""""
    fn = kernel.fn
    unit_strides = UNIT_STRIDES[fn.__name__]
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in config.kwargs or name in unit_strides:
            value = constexprs.get(name, config.kwargs.get(name, 1))
            signature[name], constants[(i,)] = "constexpr", value
            continue
        if name in POINTERS:
            signature[name] = f"*{dtype}"
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        else:
            signature[name] = "*i32" if name in INDEX_POINTERS else "i32"
        if name in POINTERS + FP32_POINTERS + INDEX_POINTERS or name.startswith("stride"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def cases():
    """(capability, name, kernel, dtype, constexprs, configs) to compile.

    Every autotune config at block 64 for bf16 and fp32 on sm_90 (fp32 is the shared-memory
    heavy one); the first config for the other dtypes and block shapes, and on sm_80.
    """
    for capability in (90, 80):
        for dtype, precision in (("bf16", "ieee"), ("fp32", "ieee"), ("fp16", "ieee"), ("fp32", "tf32")):
            if capability == 80 and dtype == "fp16":
                continue
            for block_out, block_in in ((64, 64), (16, 16), (128, 128), (16, 128)):
                sweep = capability == 90 and (block_out, block_in) == (64, 64) and precision == "ieee" and dtype != "fp16"
                common = {"UPCAST": False, "PRECISION": precision}
                for name, out, red, bias in (("fwd", block_out, block_in, True), ("grad_input", block_in, block_out, False)):
                    kernel = kernels._bsr_dsd_kernel
                    yield capability, f"dsd-{name}", kernel, dtype, {
                        **common, "HAS_BIAS": bias, "BLOCK_OUT": out, "BLOCK_RED": red,
                        "BLOCK_N": min(out, 128), "BLOCK_K": min(red, 64),
                    }, kernel.configs if sweep else kernel.configs[:1]
                kernel = kernels._bsr_sdd_kernel
                yield capability, "sdd-grad_weight", kernel, dtype, {
                    **common, "BLOCK_OUT": block_out, "BLOCK_IN": block_in,
                    "TILE_O": min(block_out, 64), "TILE_I": min(block_in, 64),
                }, kernel.configs if sweep else kernel.configs[:1]
                if capability == 90 and (block_out, block_in) in ((64, 64), (16, 128)):
                    yield from conv_cases(capability, dtype, common, block_out, block_in, sweep)


def conv_cases(capability, dtype, common, block_out, block_in, sweep):
    """The conv kernels for one block shape: 3x3 (every config when sweeping), and 1x1 at block 64."""
    for kh, kw in ((3, 3), (1, 1)) if block_out == block_in else ((3, 3),):
        every = sweep and (kh, kw) == (3, 3)
        taps = {"KH": kh, "KW": kw, "STRIDE_H": 1, "STRIDE_W": 1}
        for name, out, red, transposed in (("fwd", block_out, block_in, False), ("grad_input", block_in, block_out, True)):
            kernel = conv2d_kernels._bsr_conv2d_dsd_kernel
            strides = {"STRIDE_H": 2, "STRIDE_W": 2} if transposed else {}  # the divisibility path
            yield capability, f"conv-dsd-{name}-{kh}x{kw}", kernel, dtype, {
                **common, **taps, **strides, "TRANSPOSED": transposed, "HAS_BIAS": not transposed,
                "BLOCK_OUT": out, "BLOCK_RED": red, "BLOCK_N": min(out, 128), "BLOCK_K": min(red, 64),
            }, kernel.configs if every else kernel.configs[:1]
        kernel = conv2d_kernels._bsr_conv2d_sdd_kernel
        yield capability, f"conv-sdd-grad_weight-{kh}x{kw}", kernel, dtype, {
            **common, **taps, "BLOCK_OUT": block_out, "BLOCK_IN": block_in,
            "TILE_O": min(block_out, 64), "TILE_I": min(block_in, 64),
        }, kernel.configs if every else kernel.configs[:1]


def compile_one(job):
    """Compiles one variant; returns ``(label, failure or None, fits in shared memory)``."""
    capability, name, kernel_name, dtype, constexprs, config_index = job
    kernel = KERNELS[kernel_name]
    config = kernel.configs[config_index]
    label = f"sm_{capability} {name} {dtype} {constexprs} {config}"
    try:
        binary = compile_kernel(kernel, dtype, constexprs, config, capability)
    except Exception as error:  # noqa: BLE001 - report every compile failure
        return label, f"{type(error).__name__}: {str(error)[:300]}", False
    if (dtype != "fp32" or constexprs["PRECISION"] == "tf32") and "mma" not in binary.asm["ptx"]:
        return label, "no tensor-core instruction in the PTX", True
    return label, None, binary.metadata.shared <= SHARED_MEMORY_LIMIT[capability]


KERNELS = {
    k.fn.__name__: k
    for k in (kernels._bsr_dsd_kernel, kernels._bsr_sdd_kernel, conv2d_kernels._bsr_conv2d_dsd_kernel, conv2d_kernels._bsr_conv2d_sdd_kernel)
}


def main() -> int:
    jobs, groups = [], []
    for capability, name, kernel, dtype, constexprs, configs in cases():
        first = len(jobs)
        jobs += [(capability, name, kernel.fn.__name__, dtype, constexprs, i) for i in range(len(configs))]
        groups.append((f"sm_{capability} {name} {dtype} {constexprs}", first, len(jobs)))
    # Compiling is CPU-bound and independent: one process per core.
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, jobs, chunksize=4))
    failures = [f"{label}: {failure}" for label, failure, _ in results if failure]
    for group, first, last in groups:
        if not any(fits for _, failure, fits in results[first:last]):
            failures.append(f"{group}: no config compiles and fits in shared memory")
    print(f"compiled {len(jobs)} kernel variants with Triton {triton.__version__}")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
