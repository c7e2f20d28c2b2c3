"""Measurement harness shared by ``scripts/benchmark.py``, ``scripts/profile_step.py`` and the
throughput experiments: one benchmark shape built through the run seam (``harness``), the Hugging
Face peers on the identical batch (``peers``) and the README tables (``tables``)."""
