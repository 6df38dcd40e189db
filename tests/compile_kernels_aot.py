"""Compiles the Triton kernels ahead of time for Hopper (sm_90) and Ampere (sm_80), no GPU needed.

Run by tests/test_triton_compile.py in a process without TRITON_INTERPRET (interpreted
kernels cannot be compiled). Catches what the interpreter cannot: code that does not lower
to GPU code, configs whose shared memory fits no card, 16-bit dots that miss tensor cores.
Exit 0: all good; 1: a failure (printed); 3: this Triton's compile API is not the one known.
"""
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

import sparse_kernels.triton.linear as kernels  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}  # bytes per block on A100 / H100
POINTERS = ("a_ptr", "values_ptr", "bias_ptr", "out_ptr", "dy_ptr", "x_ptr")
INDEX_POINTERS = ("block_ptr_ptr", "block_slots_ptr", "slot_block_idx_ptr", "row_slots_ptr", "row_idx_ptr", "col_idx_ptr")
UNIT_STRIDES = ("stride_ak", "stride_on", "stride_dyn", "stride_xk", "stride_oi")


def compile_kernel(kernel, dtype, constexprs, config, capability):
    """Compiles ``kernel`` (an autotuner) as a launch with aligned, row-major tensors would."""""
    fn = kernel.fn
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in config.kwargs or name in UNIT_STRIDES:
            value = constexprs.get(name, config.kwargs.get(name, 1))
            signature[name], constants[(i,)] = "constexpr", value
            continue
        signature[name] = f"*{dtype}" if name in POINTERS else "*i32" if name in INDEX_POINTERS else "i32"
        if name in POINTERS + INDEX_POINTERS or name.startswith("stride"):
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


def main() -> int:
    failures = []
    compiled = 0
    for capability, name, kernel, dtype, constexprs, configs in cases():
        fitting = 0
        for config in configs:
            label = f"sm_{capability} {name} {dtype} {constexprs} {config}"
            try:
                binary = compile_kernel(kernel, dtype, constexprs, config, capability)
            except Exception as error:  # noqa: BLE001 - report every compile failure
                failures.append(f"{label}: {type(error).__name__}: {str(error)[:300]}")
                continue
            compiled += 1
            fitting += binary.metadata.shared <= SHARED_MEMORY_LIMIT[capability]
            if (dtype != "fp32" or constexprs["PRECISION"] == "tf32") and "mma" not in binary.asm["ptx"]:
                failures.append(f"{label}: no tensor-core instruction in the PTX")
        if not fitting:
            failures.append(f"sm_{capability} {name} {dtype} {constexprs}: no config fits in shared memory")
    print(f"compiled {compiled} kernel variants with Triton {triton.__version__}")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
