"""``make gpu-check``: one time-boxed pass over the GPU path, for a GPU lent for a few minutes.

    python -m benchmarks.gpu_check --out-dir benchmarks/results     # on the GPU machine
    GPU_CHECK_DRY_RUN=1 python -m benchmarks.gpu_check --out-dir /tmp/x   # here: CPU, tiny sizes

The stages, their order and time boxes are :mod:`benchmarks.gpu_check.runner`'s docstring.
"""
