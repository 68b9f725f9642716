"""netkit's benchmark harness: ``python -m benchmarks`` (see benchmarks/harness.py)."""
