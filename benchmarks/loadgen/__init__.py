"""The HTTP load generator behind ``python -m benchmarks.serve``."""
