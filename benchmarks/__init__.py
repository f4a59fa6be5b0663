"""Benchmarks of hf_apo against AdamW and its peers: tasks, optimizers, one runner, scoring, reports; the studies
are data in benchmarks/studies/ (``python -m benchmarks``; see benchmarks/README.md)."""
