"""Acceptance checks that need a GPU, which the CPU test suite cannot make: ``python -m benchmarks.checks.cuda_check``
(bf16/fp16 through the Trainer, fused AdamW, ...), ``python -m benchmarks.checks.fsdp_gpu_check`` (FSDP2 on GPUs)."""
