"""Compiles the Triton kernels ahead of time for Hopper (sm_90) and Ampere (sm_80), no GPU needed.

Run by tests/test_triton_compile.py in a process without TRITON_INTERPRET (interpreted
kernels cannot be compiled). Catches what the interpreter cannot: code that does not lower
to GPU code, configs whose shared memory fits no card, and, for every tensor-core variant
(16-bit, tf32), a main loop that is not what the GPU needs (:func:`inspect_binary`):
tensor-core instructions (wgmma or mma), every tile copied asynchronously
(``cp.async``, committed in the loop, so that copies for later iterations are in flight while
this one computes), no synchronous tile load, no register spill (``cuobjdump -res-usage``);
where a check cannot hold for a gather, :data:`CANNOT_HOLD` says why and the finding is
recorded as waived.
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
import sparse_kernels.conv2d.triton_vector_kernels as conv2d_vector  # noqa: E402
import sparse_kernels.linear.triton_kernels as kernels  # noqa: E402
import sparse_kernels.linear.triton_vector_kernels as vector  # noqa: E402

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
    # Vector blocks: x K-major ([C, M_pad]; conv: NCHW), dy and outputs row-major / channels-last.
    ("_bsr_vector_fwd_kernel", False): ("stride_xm", "stride_on"),
    ("_bsr_vector_grad_input_kernel", True): ("stride_dyn", "stride_oc"),
    ("_bsr_vector_grad_weight_kernel", False): ("stride_dyn", "stride_xm", "stride_po"),
    ("_bsr_conv2d_vector_fwd_kernel", False): ("stride_xw", "stride_oc"),
    ("_bsr_conv2d_vector_grad_input_kernel", True): ("stride_dyc", "stride_oc"),
    ("_bsr_conv2d_vector_grad_weight_kernel", False): ("stride_dyc", "stride_xw", "stride_po"),
}
# Strides of the vector-block kernels that are not multiples of 16 in general, so not compiled as
# such (the square kernels' strides are multiples of their block sides, >= 16): (any input channel
# count or image size: x NCHW, dx; with bo < 16, those over the groups' channels, R * bo).
VECTOR_UNALIGNED = {
    "_bsr_vector_fwd_kernel": ((), ("stride_om",)),
    "_bsr_vector_grad_input_kernel": (("stride_om",), ("stride_dym",)),
    "_bsr_vector_grad_weight_kernel": ((), ("stride_dym", "stride_psplit", "stride_ps")),
    "_bsr_conv2d_vector_fwd_kernel": (("stride_xn", "stride_xc", "stride_xh"), ("stride_on", "stride_oh", "stride_ow")),
    "_bsr_conv2d_vector_grad_input_kernel": (("stride_on", "stride_oh", "stride_ow"),
                                             ("stride_dyn", "stride_dyh", "stride_dyw")),
    "_bsr_conv2d_vector_grad_weight_kernel": (("stride_xn", "stride_xc", "stride_xh"),
                                              ("stride_dyn", "stride_dyh", "stride_dyw", "stride_psplit", "stride_ps",
                                               "stride_pt")),
}


# Checks that cannot hold for a gather, by kernel: (the problem's words, why). For 16-bit types
# only; compile_one records such a finding under the variant's "waived" instead of failing, and the
# JSON gives the reasons once ("cannot_hold").
_ELEMENT_BY_ELEMENT = (
    "the gathered tile of an NCHW activation: a (channel, tap)'s pixels are a contiguous run that starts at any "
    "element (a tap shifts it by one) and loses single pixels at image borders, so each element is its own copy; "
    "cp.async copies 4, 8 or 16 bytes, so 16-bit elements go through registers (fp32's 4-byte ones are copied "
    "asynchronously: the tf32 variants pass); the weight tile is still copied asynchronously"
)
CANNOT_HOLD = {
    "_bsr_conv2d_vector_fwd_kernel": ("loads tiles synchronously", _ELEMENT_BY_ELEMENT),
    "_bsr_conv2d_vector_grad_weight_kernel": ("loads tiles synchronously", _ELEMENT_BY_ELEMENT),
}


def compile_kernel(kernel, dtype, constexprs, config, capability, units, unaligned=()):
    """Compiles ``kernel`` (an autotuner) as a launch with aligned tensors would, the strides
    named in ``units`` specialised to 1, those in ``unaligned`` not known to be multiples of 16."""
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
        if name in POINTERS + FP32_POINTERS + INDEX_POINTERS + MULTIPLES_OF_16 or (
                name.startswith("stride") and name not in unaligned):
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
            common = {"UPCAST": False, "PRECISION": precision}
            for block_out in (16, 32, 8):
                if block_out == 16 or (capability == 90 and (dtype, precision) in (("bf16", "ieee"), ("fp32", "tf32"))):
                    sweep = capability == 90 and block_out == 16 and dtype == "bf16"
                    yield from vector_cases(capability, dtype, {**common, "BLOCK_OUT": block_out}, sweep)


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


def vector_cases(capability, dtype, common, sweep):
    """The vector-block kernels for one ``bo`` (``common["BLOCK_OUT"]``): linear and 3x3 conv, each
    product (every config when sweeping), with the largest steps the launchers take (64 pairs for
    the linear gathers, 32 for the conv's) and grad-input's 16-channel tiles."""
    block_out = common["BLOCK_OUT"]
    transposed = {"BLOCK_RED": max(block_out, 16), "BLOCK_C": vector.GRAD_INPUT_CHANNELS}
    taps = {"KH": 3, "KW": 3, "STRIDE_H": 1, "STRIDE_W": 1}
    step = conv2d_vector.GATHER_STEP
    for name, kernel, constexprs in (
        ("vector-fwd", vector._bsr_vector_fwd_kernel, {"HAS_BIAS": True, "BLOCK_K": 64}),
        ("vector-grad_input", vector._bsr_vector_grad_input_kernel, transposed),
        ("vector-grad_weight", vector._bsr_vector_grad_weight_kernel, {"BLOCK_S": 64}),
        ("conv-vector-fwd-3x3", conv2d_vector._bsr_conv2d_vector_fwd_kernel, {**taps, "HAS_BIAS": True, "BLOCK_K": step}),
        ("conv-vector-grad_input-3x3", conv2d_vector._bsr_conv2d_vector_grad_input_kernel,
         {**taps, **transposed, "STRIDE_H": 2, "STRIDE_W": 2}),  # the divisibility path
        ("conv-vector-grad_weight-3x3", conv2d_vector._bsr_conv2d_vector_grad_weight_kernel, {**taps, "BLOCK_S": step}),
    ):
        yield capability, name, kernel, dtype, {**common, **constexprs}, kernel.configs if sweep else kernel.configs[:1]


def compile_one(job):
    """Compiles and inspects one variant; returns ``(label, problems, fits in shared memory,
    record)``."""
    capability, name, kernel_name, dtype, constexprs, config_index = job
    kernel = KERNELS[kernel_name]
    config = kernel.configs[config_index]
    label = f"sm_{capability} {name} {dtype} {constexprs} {config}"
    units = UNIT_STRIDES[(kernel_name, "grad_input" in name)]
    always, narrow = VECTOR_UNALIGNED.get(kernel_name, ((), ()))
    unaligned = always + (narrow if constexprs.get("BLOCK_OUT", 16) < 16 else ())
    try:
        binary = compile_kernel(kernel, dtype, constexprs, config, capability, units, unaligned)
    except Exception as error:  # noqa: BLE001 - report every compile failure
        return label, [f"{type(error).__name__}: {str(error)[:300]}"], False, None
    record, problems = inspect_binary(binary, dtype, constexprs["PRECISION"], capability)
    waived = [problem for problem in problems
              if kernel_name in CANNOT_HOLD and dtype in ("bf16", "fp16") and CANNOT_HOLD[kernel_name][0] in problem]
    problems = [problem for problem in problems if problem not in waived]
    record.update(capability=capability, kernel=name, dtype=dtype, precision=constexprs["PRECISION"],
                  constexprs=constexprs, config=str(config), waived=waived)
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
    for k in (kernels._bsr_dsd_kernel, kernels._bsr_sdd_kernel, conv2d_kernels._bsr_conv2d_dsd_kernel,
              conv2d_kernels._bsr_conv2d_sdd_kernel, vector._bsr_vector_fwd_kernel, vector._bsr_vector_grad_input_kernel,
              vector._bsr_vector_grad_weight_kernel, conv2d_vector._bsr_conv2d_vector_fwd_kernel,
              conv2d_vector._bsr_conv2d_vector_grad_input_kernel, conv2d_vector._bsr_conv2d_vector_grad_weight_kernel)
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
    parser.add_argument("--match", default="", help="compile only the variants whose name contains this")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    jobs, groups = [], []
    for capability, name, kernel, dtype, constexprs, configs in cases():
        if args.match not in name:
            continue
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
            cannot_hold = {kernel: {"check": check, "why": why} for kernel, (check, why) in CANNOT_HOLD.items()}
            json.dump({"triton": triton.__version__, "cannot_hold": cannot_hold, "variants": records}, handle, indent=1)
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
