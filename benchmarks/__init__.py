"""Benchmarks of hf_apo against AdamW and its peers: ``overhead.py`` (cost) and ``quality.py`` (results).

Run them from the repository root, e.g. ``python benchmarks/overhead.py`` (see benchmarks/README.md).
"""
