"""``python -m benchmarks.gpu_check``: the whole check, or (``--stage``) one stage in this process."""
import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
