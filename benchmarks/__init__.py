"""Benchmarks: runners that write JSON (``python -m benchmarks.linear``) and a
pytest-benchmark suite (``make bench``). Never run as tests."""
