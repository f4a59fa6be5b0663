"""Test-session settings.

The models here are tiny: one intra-op thread is as fast as two, and it keeps OpenMP from spinning against other
processes on a small shared CI machine (two threads on a busy 2-core machine made steps 10-20x slower).
"""

import torch

torch.set_num_threads(1)


# The longest files first, by `pytest --durations=0` (seconds summed per file; the order is what counts): the slow
# tier's test_benchmarks (the quality study's quick run split between it and test_benchmarks_quality, so that both
# workers share it), test_example_translation, test_trainer_benchmarks, test_distributed, test_hub_offline; the fast
# tier's test_trainer, test_theorem1, test_fsdp, test_peft. pytest-xdist (``--dist loadfile``) hands whole files to
# its two workers in collection order, so these go first and the short files fill in behind them; otherwise a long
# file taken last keeps one worker busy alone.
LONG_FILES = ("test_benchmarks_quality.py", "test_benchmarks.py", "test_example_translation.py",
              "test_trainer_benchmarks.py", "test_distributed.py", "test_hub_offline.py", "test_trainer.py",
              "test_theorem1.py", "test_fsdp.py", "test_peft.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept
