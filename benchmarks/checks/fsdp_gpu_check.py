"""The GPU check of --apo under the Trainer's FSDP2 (Accelerate), which the CPU tests can only force.

    python -m benchmarks.checks.fsdp_gpu_check --output_dir OUT          # on a machine with 1 or more GPUs
    python -m benchmarks.checks.fsdp_gpu_check --output_dir OUT --cpu    # the same checks on 2 CPU processes (dry run)

For APO-LR (loss on the same batch, and on the next one) and APO-Precond it trains the tiny Llama of the tests
(tests/scripts/train_tiny.py, 8 steps, a meta step every 2) with --fsdp full_shard --fsdp_config '{"version": 2}' and
without FSDP (DDP, or one process with one GPU), on min(2, GPUs) processes, and checks:

* FSDP2 is really on (the parameters are DTensors) and φ is identical on every rank;
* FSDP2 equals the run without it: relative difference of the parameters and of φ below 1e-5 (1e-7 measured on
  CPU processes);
* a run killed with SIGKILL at step 7 and resumed from checkpoint-4 ends bitwise equal to the uninterrupted one.

With one GPU the FSDP2 run has one rank: it checks the Accelerate/CUDA path, not the sums across ranks (the CPU
tests check those). Writes OUT/fsdp_gpu_check.json and exits non-zero if a check fails. When it passes on GPUs, the
opt-in HF_APO_FSDP2=1 (hf_apo/apo_config.py, check_apo_fsdp) can go. Takes about 3–4 minutes on one GPU.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SCRIPT = os.path.join(ROOT, "tests", "scripts", "train_tiny.py")
COMMON = ["--llama", "--max_steps", "8", "--per_device_train_batch_size", "4", "--apo_meta_interval", "2",
          "--apo_meta_batch_fraction", "1.0", "--report_to", "none", "--learning_rate", "1e-3",
          "--lr_scheduler_type", "constant", "--logging_steps", "2", "--seed", "0", "--data_seed", "0",
          "--disable_tqdm", "true"]
FSDP2 = ["--fsdp", "full_shard", "--fsdp_config", '{"version": 2}', "--save_strategy", "steps", "--save_steps", "4"]
VARIANTS = {  # tests/test_distributed.py runs lr_next on CPU processes (tests/test_fsdp.py: each, in a plain loop)
    "lr": ["--apo", "lr", "--apo_loss_batch", "same", "--apo_meta_lr", "0.2"],
    # Rprop's step sizes and the adaptive cadence follow the signs of the reduced meta-gradient (the same on every rank)
    "lr_next": ["--apo", "lr", "--apo_loss_batch", "next", "--apo_lambda_fsd", "1", "--apo_horizon", "10",
                "--apo_meta_lr", "0.2", "--apo_meta_optimizer", "rprop", "--apo_adaptive_interval", "true"],
    # --diagonal_rows: the unsharded run gets the factors FSDP2 allows
    "precond": ["--apo", "precond", "--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.05",
                "--apo_meta_lr", "0.05", "--diagonal_rows"],
}


def launch(output_dir, args, processes, check=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               SCRIPT, "--output_dir", str(output_dir), *args]
    env = dict(os.environ, HF_APO_FSDP2="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check and completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    return completed


def load(output_dir, rank=0):
    return torch.load(os.path.join(output_dir, f"final_rank{rank}.pt"), weights_only=False)


def relative_difference(a, b):
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


def check_variant(name, work, processes, device_args):
    args = [*COMMON, *VARIANTS[name], *device_args]
    launch(os.path.join(work, "fsdp"), [*args, *FSDP2], processes)
    launch(os.path.join(work, "plain"), [*args, "--save_strategy", "no"], processes)
    fsdp = [load(os.path.join(work, "fsdp"), rank) for rank in range(processes)]
    plain = load(os.path.join(work, "plain"))
    out = {
        "sharded": fsdp[0]["sharded"],
        "meta_equal_on_ranks": all(all(torch.equal(a, b) for a, b in zip(fsdp[0]["meta"], r["meta"])) for r in fsdp),
        "params_rel_diff": relative_difference(fsdp[0]["params"], plain["params"]),
        "meta_rel_diff": relative_difference(fsdp[0]["meta"], plain["meta"]),
        "meta_steps": [h["apo/meta_steps"] for h in fsdp[0]["log_history"] if "apo/meta_steps" in h][-1],
    }
    killed_dir = os.path.join(work, "killed")
    out["killed_exit_code"] = launch(killed_dir, [*args, *FSDP2, "--kill_at_step", "7"], processes, False).returncode
    launch(killed_dir, [*args, *FSDP2, "--resume_from_checkpoint", os.path.join(killed_dir, "checkpoint-4")], processes)
    resumed = [load(killed_dir, rank) for rank in range(processes)]
    out["resume_bitwise_equal"] = all(all(map(torch.equal, r["params"] + r["meta"], s["params"] + s["meta"]))
                                      for r, s in zip(resumed, fsdp))
    out["ok"] = (out["sharded"] and out["meta_equal_on_ranks"] and out["params_rel_diff"] < 1e-5
                 and out["meta_rel_diff"] < 1e-5 and out["killed_exit_code"] != 0 and out["resume_bitwise_equal"])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default=".")
    parser.add_argument("--cpu", action="store_true", help="dry run on 2 CPU processes (Accelerate's FSDP2 forced)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if args.cpu:
        processes, device_args, device = 2, ["--use_cpu", "--force_fsdp_on_cpu"], "cpu (forced FSDP2)"
    else:
        assert torch.cuda.is_available(), "no GPU: pass --cpu for the dry run"
        processes, device_args = min(2, torch.cuda.device_count()), []
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    import accelerate
    import transformers

    results = {"device": device, "processes": processes, "torch": torch.__version__,
               "transformers": transformers.__version__, "accelerate": accelerate.__version__, "variants": {}}
    with tempfile.TemporaryDirectory() as work:
        for name in args.variants.split(","):
            try:
                results["variants"][name] = check_variant(name, os.path.join(work, name), processes, device_args)
            except RuntimeError as error:  # a failed launch is a failed check; keep its message
                results["variants"][name] = {"ok": False, "error": str(error)[-3000:]}
            print(name, json.dumps(results["variants"][name])[:500], flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "fsdp_gpu_check.json"), "w") as f:
        json.dump(results, f, indent=2)
    failed = [name for name, out in results["variants"].items() if not out["ok"]]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
