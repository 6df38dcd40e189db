"""GroupNorm followed by SiLU as one op (diffusers' ResnetBlock2D calls them back to back):
``op.py`` (the op and the module), ``kernels.py`` (what Python registers), ``reference.py``."""
