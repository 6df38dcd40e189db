"""``python -m sparse_diffusion``: the ``sparse-diffusion`` command."""
import sys

from .cli import main

sys.exit(main())
