"""Acceptance checks that need a GPU, which the CPU test suite cannot make (run from the repository root):

    python -m benchmarks.checks.cuda_check --output_dir OUT        bf16/fp16 through the Trainer, fused AdamW, ...
    python -m benchmarks.checks.fsdp_gpu_check --output_dir OUT    --apo under the Trainer's FSDP2 on GPUs
"""
