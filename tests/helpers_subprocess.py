"""Running tests/scripts/train_tiny.py: in fresh processes (plain, torchrun, killed and resumed), or forked from the
test process (``train_forked``: the same ``main``, no interpreter start or imports; a SIGKILL ends the child only)."""

import importlib.util
import os
import subprocess
import sys

import torch

from distributed_testing import run_on_ranks

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_tiny.py")
COMMON = [
    "--use_cpu", "--report_to", "none", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
    "--logging_steps", "2", "--seed", "0", "--data_seed", "0", "--disable_tqdm", "true",
]


def environment():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def train(output_dir, *args, processes=1, check=True, extra_env=None):
    if processes == 1:
        command = [sys.executable, SCRIPT]
    else:
        # --standalone: a local rendezvous on a free port (two test runs never collide)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   SCRIPT]
    command += ["--output_dir", str(output_dir), *COMMON, *map(str, args)]
    completed = subprocess.run(command, env={**environment(), **(extra_env or {})}, capture_output=True, text=True,
                               timeout=180)
    if check and completed.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}")
    return completed


def script():
    """tests/scripts/train_tiny.py as a module, imported once in the test process (with transformers and hf_apo),
    so that forked children start with everything imported."""
    if "train_tiny" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["train_tiny"] = module
    return sys.modules["train_tiny"]


def _main(rank, world_size, argv):
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    script().main(argv)


def train_forked(output_dir, *args, check=True):
    """train_tiny.py's ``main`` in one process forked from this one; its exit code (``check``: 0, or its traceback
    raised)."""
    script()
    argv = ["--output_dir", str(output_dir), *COMMON, *map(str, args)]
    if check:
        run_on_ranks(_main, argv, world_size=1, timeout=180)
        return 0
    _, (code,) = run_on_ranks(_main, argv, world_size=1, timeout=180, check=False)
    return code


def result(output_dir, rank=0):
    return torch.load(os.path.join(output_dir, f"final_rank{rank}.pt"), weights_only=False)
