"""Compiles the Triton kernels ahead of time for Hopper (sm_90) and Ampere (sm_80), no GPU needed.

Run by tests/test_triton_compile.py in a process without TRITON_INTERPRET (interpreted
kernels cannot be compiled). Catches what the interpreter cannot: code that does not lower
to GPU code, configs whose shared memory fits no card, and, for every tensor-core variant
(16-bit, tf32), a main loop that is not what the GPU needs (:func:`inspect_binary`):
tensor-core instructions (wgmma or mma), every tile copied asynchronously
(``cp.async``, committed in the loop, so that copies for later iterations are in flight while
this one computes), no synchronous tile load, no register spill (``cuobjdump -res-usage``).
Launches are specialised as at run time: every stride that is 1 for the tensors the launchers
pass is a constant 1 here (Triton specialises integer arguments equal to 1).

    python tests/kernels/compile_kernels_aot.py [--json FILE]   # FILE: what was found, per variant

Exit 0: all good; 1: a failure (printed); 3: this Triton's compile API is not the one known.
"""
import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

assert "TRITON_INTERPRET" not in os.environ, "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as error:  # pragma: no cover - other Triton versions
    print(f"unknown Triton compile API ({triton.__version__}): {error}")
    sys.exit(3)

import sparse_kernels.conv2d.triton_kernels as conv2d_kernels  # noqa: E402
import sparse_kernels.linear.triton_kernels as kernels  # noqa: E402

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}  # bytes per block on A100 / H100
POINTERS = ("a_ptr", "src_ptr", "values_ptr", "bias_ptr", "out_ptr", "dy_ptr", "x_ptr", "xt_ptr")
FP32_POINTERS = ("partial_ptr",)
INDEX_POINTERS = ("block_ptr_ptr", "block_slots_ptr", "slot_block_idx_ptr", "row_slots_ptr", "row_idx_ptr", "col_idx_ptr",
                  "row_ptr_ptr", "col_ptr_ptr", "col_slots_ptr")
# Integer arguments the launchers always pass as multiples of 16 (Triton then specialises them so):
# the grad-weight kernels' row chunk, a multiple of 256.
MULTIPLES_OF_16 = ("CHUNK",)
# Unit strides as launches specialise them: linear operands are row-major, conv operands
# channels-last, values [nnz, bo, bi] (conv: tap-major [nnz, kh, kw, bo, bi]) contiguous, so
# the forward reads them with unit stride along the reduction (stride_vk) and grad-input,
# which reads them transposed, along its output (stride_vn).
# Keyed by (kernel, whether it reads the values transposed: grad-input).
UNIT_STRIDES = {
    ("_bsr_dsd_kernel", False): ("stride_ak", "stride_on", "stride_vk"),
    ("_bsr_dsd_kernel", True): ("stride_ak", "stride_on", "stride_vn"),
    ("_bsr_sdd_kernel", False): ("stride_dyn", "stride_xk", "stride_pi"),
    ("_bsr_conv2d_dsd_kernel", False): ("stride_sc", "stride_oc", "stride_vk"),
    ("_bsr_conv2d_dsd_kernel", True): ("stride_sc", "stride_oc", "stride_vn"),
    ("_bsr_conv2d_sdd_kernel", False): ("stride_dyc", "stride_xc", "stride_pi"),
}


def compile_kernel(kernel, dtype, constexprs, config, capability, units):
    """Compiles ``kernel`` (an autotuner) as a launch with aligned tensors would, the strides
    named in ``units`` specialised to 1."""
    fn = kernel.fn
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in config.kwargs or name in units:
            value = constexprs.get(name, config.kwargs.get(name, 1))
            signature[name], constants[(i,)] = "constexpr", value
            continue
        if name in POINTERS:
            signature[name] = f"*{dtype}"
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        else:
            signature[name] = "*i32" if name in INDEX_POINTERS else "i32"
        if name in POINTERS + FP32_POINTERS + INDEX_POINTERS + MULTIPLES_OF_16 or name.startswith("stride"):
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
                tile_o, tile_i = kernels.sdd_tiles(block_out, block_in, TORCH_DTYPES[dtype])
                yield capability, "sdd-grad_weight", kernel, dtype, {
                    **common, "BLOCK_OUT": block_out, "BLOCK_IN": block_in, "TILE_O": tile_o, "TILE_I": tile_i,
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
    """Compiles and inspects one variant; returns ``(label, problems, fits in shared memory,
    record)``."""
    capability, name, kernel_name, dtype, constexprs, config_index = job
    kernel = KERNELS[kernel_name]
    config = kernel.configs[config_index]
    label = f"sm_{capability} {name} {dtype} {constexprs} {config}"
    units = UNIT_STRIDES[(kernel_name, "grad_input" in name)]
    try:
        binary = compile_kernel(kernel, dtype, constexprs, config, capability, units)
    except Exception as error:  # noqa: BLE001 - report every compile failure
        return label, [f"{type(error).__name__}: {str(error)[:300]}"], False, None
    record, problems = inspect_binary(binary, dtype, constexprs["PRECISION"], capability)
    record.update(capability=capability, kernel=name, dtype=dtype, precision=constexprs["PRECISION"],
                  constexprs=constexprs, config=str(config))
    return label, problems, binary.metadata.shared <= SHARED_MEMORY_LIMIT[capability], record


TILE_LOAD = re.compile(r"\bld\.global(\.[\w:]+)*")  # any global load; scalar 32-bit ones are indices
SCALAR_INDEX_LOAD = re.compile(r"\bld\.global(\.nc)?(\.L[12]::\w+)*\.b32\b")


def main_loops(ptx):
    """The bodies of the innermost loops of ``ptx`` that hold a tensor-core or FMA dot."""
    loops = []
    for match in re.finditer(r"^(\$L__BB\d+_\d+):\s*// =>This Inner Loop Header", ptx, re.M):
        label = match.group(1)
        end = re.search(rf"bra(\.uni)?\s+{re.escape(label)};", ptx[match.end():])
        if end:
            loops.append(ptx[match.end():match.end() + end.end()])
    return [body for body in loops if re.search(r"\b(wgmma\.mma_async|mma\.sync|fma\.rn\.f32)", body)]


def inspect_binary(binary, dtype, precision, capability):
    """What the compiled variant does in its main loop, and what is wrong with it (for a
    tensor-core variant: no wgmma/mma, a tile not copied asynchronously, a register spill)."""
    ptx = binary.asm["ptx"]
    loops = main_loops(ptx)
    body = max(loops, key=len) if loops else ""
    mix = {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", body)),
        "mma_sync": len(re.findall(r"\bmma\.sync", body)),
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\.", body)),
        "cp_async_commit": len(re.findall(r"\bcp\.async\.commit_group", body)),
        "tma": len(re.findall(r"\bcp\.async\.bulk", body)),
        "sync_tile_loads": len([m for m in TILE_LOAD.finditer(body) if not SCALAR_INDEX_LOAD.match(body, m.start())]),
        "st_shared": len(re.findall(r"\bst\.shared", body)),
    }
    record = {"registers": None, "spill_bytes": None, "shared_bytes": binary.metadata.shared,
              "num_warps": binary.metadata.num_warps, "num_stages": binary.metadata.num_stages,
              "main_loop": mix if loops else None}
    record.update(resource_usage(binary.asm["cubin"]))
    problems = []
    tensor_cores = dtype != "fp32" or precision == "tf32"
    if not tensor_cores:
        # fp32 without tf32 runs on FMAs: recorded (its largest tiles spill a little), not
        # checked; the autotuner times the configs and does not pick a slow one.
        return record, problems
    if record["spill_bytes"]:
        problems.append(f"spills {record['spill_bytes']} bytes to local memory")
    if "mma" not in ptx:
        problems.append("no tensor-core instruction in the PTX")
    elif not loops:
        problems.append("no main loop with a dot found in the PTX")
    else:
        if not (mix["wgmma"] or mix["mma_sync"]):  # wgmma needs 64-row tiles: 16-row ones use mma
            problems.append("the main loop has no tensor-core instruction (wgmma or mma)")
        if not (mix["tma"] or (mix["cp_async"] and mix["cp_async_commit"])):
            problems.append("the main loop copies no tile asynchronously: it is not software-pipelined")
        if mix["sync_tile_loads"] or mix["st_shared"]:
            problems.append(f"the main loop loads tiles synchronously ({mix['sync_tile_loads']} global loads into "
                            f"registers, {mix['st_shared']} shared stores): those copies are not pipelined")
    return record, problems


def resource_usage(cubin):
    """Registers and spilled bytes (local memory + stack) of the kernel in ``cubin``, from
    ``cuobjdump -res-usage`` (None where no cuobjdump is found)."""
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                      "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    if "REG" not in usage:
        return {}
    return {"registers": int(usage["REG"]), "spill_bytes": int(usage.get("STACK", 0)) + int(usage.get("LOCAL", 0))}


KERNELS = {
    k.fn.__name__: k
    for k in (kernels._bsr_dsd_kernel, kernels._bsr_sdd_kernel, conv2d_kernels._bsr_conv2d_dsd_kernel, conv2d_kernels._bsr_conv2d_sdd_kernel)
}


def self_test() -> int:
    """The checks catch what they are for: the forward kernel compiled with the values'
    stride left unspecialised (the AOT test's old launch) loads that tile synchronously, and a
    one-stage config is not pipelined; as the launchers run it, it passes. Exit 0 if so."""
    kernel = kernels._bsr_dsd_kernel
    constexprs = {"UPCAST": False, "PRECISION": "ieee", "HAS_BIAS": True, "BLOCK_OUT": 64, "BLOCK_RED": 64,
                  "BLOCK_N": 64, "BLOCK_K": 64}
    config = kernel.configs[0]
    one_stage = triton.Config(dict(config.kwargs), num_warps=config.num_warps, num_stages=1)
    units = UNIT_STRIDES[("_bsr_dsd_kernel", False)]
    expectations = [
        ("as launched", units, config, None),
        ("stride_vk not specialised", tuple(u for u in units if u != "stride_vk"), config, "loads tiles synchronously"),
        ("one stage", units, one_stage, "not software-pipelined"),
    ]
    wrong = 0
    for label, case_units, case_config, expected in expectations:
        binary = compile_kernel(kernel, "bf16", constexprs, case_config, 90, case_units)
        _, problems = inspect_binary(binary, "bf16", "ieee", 90)
        ok = not problems if expected is None else any(expected in p for p in problems)
        wrong += not ok
        print(f"{'ok' if ok else 'WRONG'}: {label}: {problems or 'no problem found'}")
    return 1 if wrong else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write what was found, per compiled variant, to this file")
    parser.add_argument("--self-test", action="store_true", help="check that the checks catch known-bad kernels")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    jobs, groups = [], []
    for capability, name, kernel, dtype, constexprs, configs in cases():
        first = len(jobs)
        jobs += [(capability, name, kernel.fn.__name__, dtype, constexprs, i) for i in range(len(configs))]
        groups.append((f"sm_{capability} {name} {dtype} {constexprs}", first, len(jobs)))
    # Compiling is CPU-bound and independent: one process per core.
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, jobs, chunksize=4))
    failures = [f"{label}: {problem}" for label, problems, _, _ in results for problem in problems]
    for group, first, last in groups:
        if not any(fits for _, _, fits, _ in results[first:last]):
            failures.append(f"{group}: no config compiles and fits in shared memory")
    print(f"compiled {len(jobs)} kernel variants with Triton {triton.__version__}")
    if args.json:
        records = [dict(record, problems=problems) for _, problems, _, record in results if record]
        with open(args.json, "w") as handle:
            json.dump({"triton": triton.__version__, "variants": records}, handle, indent=1)
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
