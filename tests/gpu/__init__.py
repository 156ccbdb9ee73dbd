"""The GPU check (docs/gpu.md): ``python -m tests.gpu.check``; not part of the suite."""
