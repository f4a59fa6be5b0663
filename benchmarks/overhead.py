"""What APO costs: step time and peak memory of APO-LR and APO-Precond against AdamW and the peers.

On a tiny T5 built from a config with the translation example's shape (d_model 128, d_ff 512, 2+2 layers;
vocabulary 1000, batch 32, 16 tokens) and on wider ones (d_model 256 and 512), every optimizer trains its own copy of the same model on the same batches, driven by
the same plain loop (``common.train_step``: forward, backward, ``observe`` for APO, ``step``, ``zero_grad``).

Step time. The optimizers run round-robin: repetition r runs one *block* of each optimizer in turn (the order
rotated every repetition), so machine noise hits all of them alike. A block is one full meta period — K steps
for APO (exactly one meta step in it), 10 steps for the others (SOAP's preconditioner refresh period, 2, divides
it) — so a block's mean step time is the amortized cost. The reported step time is the median over repetitions of
the block means; a ratio is that median over AdamW's. For APO the medians of the plain and the meta steps alone
are reported too ("one meta step costs X AdamW steps").

Peak memory. On CUDA: ``torch.cuda.max_memory_allocated`` over a meta step and a plain step, each optimizer alone
on the device (a fresh model, everything else freed). On CPU, where no allocator keeps statistics: the bytes alive
before the window (parameters and optimizer state, counted from the tensors) plus the peak of the running sum of
the allocations and frees that the PyTorch profiler records in order (``profile_memory=True``), over the last
plain step and the first meta step of the warm-up block. Beside it, analytically from tensors: the bytes each optimizer keeps between steps
(its ``state``, and for APO the meta-parameters, their Adam moments, cached factors and the two kept batches).

Usage::

    python benchmarks/overhead.py                 # the full run (10-14 minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick --output_dir /tmp/overhead
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    DEFAULT_OUTPUT_DIR,
    MethodSpec,
    apo_lr_defaults,
    build_optimizer,
    environment,
    finish_environment,
    last_step_was_meta,
    markdown_table,
    optimizer_state_bytes,
    parameter_bytes,
    progress,
    train_step,
    write_json,
)
from hf_apo import KroneckerFactors

VOCAB = 1000
BATCH = 32
SEQ_LEN = 16

# d_model -> (d_ff, heads); T5 convention d_ff = 4·d_model, head size 32 (64 from d_model 512 on)
# "tiny" is the shape of the translation example's T5 (examples/translation/offline_default.py: d_model 128,
# d_ff 512, 4 heads of 32, 2 + 2 layers); "d64" is smaller still, d256, d512 and d1024 are the wider ones.
SIZES = {
    "d64": dict(d_model=64, d_ff=256, num_heads=2),
    "tiny": dict(d_model=128, d_ff=512, num_heads=4),
    "d256": dict(d_model=256, d_ff=1024, num_heads=8),
    "d512": dict(d_model=512, d_ff=2048, num_heads=8),
    "d1024": dict(d_model=1024, d_ff=4096, num_heads=16),
}

# The optimizers every size runs, and the APO-LR levers: of the paper's objective (meta batch fraction × meta interval,
# no B′ passes) and of the "next" one (a one-step horizon; a meta step every step).
CORE_METHODS = [
    MethodSpec("adamw", "adamw", lr=1e-3),
    MethodSpec("apo_lr", "apo_lr", lr=1e-3, **apo_lr_defaults()),  # hf_apo's default (hf_apo/apo_config.py)
    MethodSpec("apo_lr_paper", "apo_lr", lr=1e-3),  # the paper's objective: same batch, lambda_fsd 10, K 10
    MethodSpec("apo_precond", "apo_precond", lr=1e-2, momentum=0.9),
    MethodSpec("sgd_momentum", "sgd", lr=1e-2, momentum=0.9),  # APO-Precond's base rule
    MethodSpec("prodigy", "prodigy", lr=1.0),
    MethodSpec("sf_adamw", "sf_adamw", lr=1e-3),
    MethodSpec("soap", "soap", lr=3e-3),
]
LEVER_METHODS = [
    MethodSpec("apo_lr_frac1", "apo_lr", lr=1e-3, meta_batch_fraction=1.0),
    MethodSpec("apo_lr_k16", "apo_lr", lr=1e-3, meta_interval=16),
    MethodSpec("apo_lr_k16_frac1", "apo_lr", lr=1e-3, meta_interval=16, meta_batch_fraction=1.0),
    MethodSpec("apo_lr_no_fsd", "apo_lr", lr=1e-3, lambda_fsd=0.0, lambda_wsd=1.0),
    # loss_batch "next" (the loss term from the next step's gradient), without proximity terms: dot products only
    MethodSpec("apo_lr_next_h1", "apo_lr", lr=1e-3, loss_batch="next", lambda_fsd=0.0),
    MethodSpec("apo_lr_next_k1", "apo_lr", lr=1e-3, loss_batch="next", lambda_fsd=0.0, meta_interval=1, meta_lr=0.01),
    # --apo_adaptive_interval's cost while the LR keeps moving (a meta step at every step), with Rprop's meta step
    MethodSpec("apo_lr_every_step", "apo_lr", lr=1e-3, **{**apo_lr_defaults(), "meta_interval": 1,
                                                         "meta_optimizer": "rprop"}),
    MethodSpec("apo_precond_frac1", "apo_precond", lr=1e-2, momentum=0.9, meta_batch_fraction=1.0),
    MethodSpec("apo_precond_cap256", "apo_precond", lr=1e-2, momentum=0.9, max_factor_dim=256),
    # issue 18: over AdamW (--optim adamw_torch), as it ships and with the size and shape apart
    # (benchmarks/apo_precond_split.py's candidates)
    MethodSpec("apo_precond_adamw", "apo_precond", lr=1e-3, precond_base="adamw"),
    MethodSpec("apo_precond_split_same", "apo_precond", lr=1e-3, precond_base="adamw", precond_size="lr"),
    MethodSpec("apo_precond_split_next", "apo_precond", lr=1e-3, precond_base="adamw", precond_size="lr",
               loss_batch="next", lambda_fsd=0.0),
]
SECOND_ORDER_PEER = "soap"
FACTOR_CAPS = (128, 256, 512, 1024)


def build_model(size: str, seed: int = 0, device: str = "cpu"):
    from transformers import T5Config, T5ForConditionalGeneration

    dims = SIZES[size]
    config = T5Config(
        vocab_size=VOCAB, d_model=dims["d_model"], d_kv=dims["d_model"] // dims["num_heads"], d_ff=dims["d_ff"],
        num_layers=2, num_decoder_layers=2, num_heads=dims["num_heads"], dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).to(device)


def make_batches(count: int, seed: int, device: str, seq_len: int = SEQ_LEN) -> list[dict[str, torch.Tensor]]:
    """Random token batches (a reversal task); only their shapes matter for cost."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(2, VOCAB, (BATCH, seq_len), generator=generator)
        batches.append(
            {"input_ids": tokens.to(device), "attention_mask": torch.ones_like(tokens).to(device),
             "labels": tokens.flip(1).to(device)}
        )
    return batches


def block_length(spec: MethodSpec) -> int:
    return spec.meta_interval if spec.is_apo else 10


class Runner:
    """One optimizer on its own copy of the model, with its step times and a meta-step breakdown."""

    def __init__(self, spec: MethodSpec, size: str, batches, device: str, total_steps: int):
        self.spec = spec
        self.model = build_model(size, device=device)
        self.model.train()
        self.optimizer, self.scheduler = build_optimizer(spec, self.model, total_steps=total_steps)
        self.batches = batches
        self.device = device
        self.steps = 0
        self.plain_times: list[float] = []
        self.meta_times: list[float] = []
        self.block_means: list[float] = []
        self.meta_parts: dict[str, list[float]] = {}
        self._in_meta = False
        if spec.is_apo:
            self._instrument()

    def _instrument(self) -> None:
        """Times the parts of a meta step by wrapping bound methods on the instances (hf_apo is not modified).

        APO-LR: the target forward on B′, the look-ahead forward/backward, and the base optimizer's update taken
        inside the meta step; APO-Precond: the same two passes and the whole ``meta_update``.
        """
        optimizer, objective = self.optimizer, self.optimizer.objective
        self._wrap(optimizer, "step", "optimizer_step", only_in_meta_step=True)
        self._wrap(objective, "target", "target_forward")
        self._wrap(objective, "lookahead_gradient", "lookahead_forward_backward")
        if hasattr(optimizer, "_meta_step"):  # APO-LR
            self._wrap(optimizer, "_meta_step", None, marks_meta=True)
            self._wrap(optimizer, "_base_step", "base_update", only_in_meta=True)
        if hasattr(optimizer, "meta_update"):  # APO-Precond
            self._wrap(optimizer, "meta_update", "meta_update", marks_meta=True)

    def _wrap(
        self, owner, name: str, key: str | None, only_in_meta: bool = False, marks_meta: bool = False,
        only_in_meta_step: bool = False,
    ) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if only_in_meta and not self._in_meta:
                return original(*args, **kwargs)
            if only_in_meta_step and (self.optimizer.step_count + 1) % self.optimizer.meta_interval != 0:
                return original(*args, **kwargs)
            self._sync()
            start = time.perf_counter()
            if marks_meta:
                self._in_meta = True
            try:
                result = original(*args, **kwargs)
            finally:
                if marks_meta:
                    self._in_meta = False
            self._sync()
            if key is not None:
                self.meta_parts.setdefault(key, []).append(time.perf_counter() - start)
            return result

        setattr(owner, name, timed)

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def step(self) -> tuple[float, bool]:
        batch = self.batches[self.steps % len(self.batches)]
        self._sync()
        start = time.perf_counter()
        train_step(self.model, self.optimizer, batch, scheduler=self.scheduler)
        self._sync()
        elapsed = time.perf_counter() - start
        self.steps += 1
        return elapsed, last_step_was_meta(self.optimizer)

    def run_block(self, record: bool = True) -> None:
        times = []
        for _ in range(block_length(self.spec)):
            elapsed, meta = self.step()
            times.append(elapsed)
            if record:
                (self.meta_times if meta else self.plain_times).append(elapsed)
        if record:
            self.block_means.append(sum(times) / len(times))


def cpu_peak_bytes(runner: Runner, steps: int) -> int | None:
    """Peak live tensor bytes over ``steps`` steps: the bytes alive before them (parameters, optimizer state, kept
    batches; the gradients were freed by ``zero_grad``) plus the peak of the running sum of the CPU allocations
    and frees that the profiler records in order (``profile_memory=True``). None if the profiler gives nothing."""
    from torch.profiler import ProfilerActivity, profile

    before = parameter_bytes(runner.model) + optimizer_state_bytes(runner.optimizer, runner.model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            runner.step()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception as error:  # pragma: no cover - private API moved
        print(f"warning: CPU memory profile unavailable ({error!r}); peak memory not measured", file=sys.stderr)
        return None
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()
            peak = max(peak, live)
    return before + peak if events else None


def cuda_peak_bytes(spec: MethodSpec, size: str, batches, total_steps: int) -> int:
    """max_memory_allocated over a plain and a meta step, this optimizer alone on the device."""
    gc.collect()  # a Runner is a reference cycle (its instrumented objective points back to it)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    runner = Runner(spec, size, batches, "cuda", total_steps)
    period = block_length(spec)
    for _ in range(period - 2):
        runner.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runner.step()
    runner.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def factor_memory(size: str) -> dict[str, float]:
    """APO-Precond's factor memory over the parameter memory, per cap: a dense factor keeps itself, its cached AAᵀ
    and one meta-Adam moment (its second moment is one number, ``FactorAdam``); a diagonal one, two moments."""
    model = build_model(size)
    param_numel = sum(p.numel() for p in model.parameters())
    ratios = {}
    for cap in FACTOR_CAPS:
        numel = 0
        for p in model.parameters():
            numel += sum((3 if t.dim() == 2 else 4) * t.numel() for t in KroneckerFactors(p, cap).tensors)
        ratios[f"cap_{cap}"] = numel / param_numel
    return ratios


def measure_size(
    size: str, methods: list[MethodSpec], reps: int, device: str, seed: int, profile_memory: bool = True,
    seq_len: int = SEQ_LEN,
) -> dict:
    batches = make_batches(8, seed, device, seq_len)
    total_steps = (reps + 2) * max(block_length(m) for m in methods)
    runners = [Runner(spec, size, batches, device, total_steps) for spec in methods]
    param_b = parameter_bytes(runners[0].model)

    # Warm-up block per optimizer (allocates state, takes the first meta step); on CPU its last two steps (the
    # last plain step and the first meta step) are the memory profile window.
    peaks: dict[str, int | None] = {}
    for runner in progress(runners, desc=f"{size} warm-up", leave=False):
        period = block_length(runner.spec)
        for _ in range(period - 2):
            runner.step()
        if device == "cpu" and profile_memory:
            peaks[runner.spec.name] = cpu_peak_bytes(runner, 2)
        else:
            runner.step()
            runner.step()
    for runner in runners:  # one unrecorded block each: first-call and post-profiler costs stay out of the timing
        runner.run_block(record=False)

    bar = progress(total=reps * len(runners), desc=f"{size} timing", leave=False)
    for rep in range(reps):
        shift = rep % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            runner.run_block()
            bar.update()
    bar.close()

    out = size_result(size, methods, runners, param_b)
    if device == "cuda":
        del runners[:]  # each optimizer alone on the device for its peak
        for spec in methods:
            peaks[spec.name] = cuda_peak_bytes(spec, size, batches, total_steps)
    add_peaks(out, peaks, param_b)
    return out


def warm_up_profiler() -> None:
    """The profiler's first use costs seconds; pay it before anything is measured."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        torch.ones(8).add_(1)


def run(args) -> dict:
    started = time.perf_counter()
    info = environment()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    info["benchmark_device"] = device
    info["contention_note"] = (
        "CPU timings on a shared machine: other processes may have used the cores during the run (see the load "
        "averages). The round-robin order spreads such noise over all optimizers alike, but absolute times and, "
        "less so, ratios move with it."
    )
    if device == "cpu" and not args.no_memory_profile:
        warm_up_profiler()
    sizes = args.sizes
    lever_sizes = [s for s in args.lever_sizes if s in sizes]
    results: dict = {"environment": info, "sizes": {}, "settings": {
        "vocab": VOCAB, "batch": BATCH, "seq_len": args.seq_len, "model": "T5ForConditionalGeneration 2+2 layers, tied",
        "dims": {s: SIZES[s] for s in sizes}, "reps": args.reps, "timing": "median over repetitions of the mean "
        "step time of one block (one meta period: K steps for APO, 10 for the others), round-robin order",
        "peak_memory_method": "cuda max_memory_allocated" if device == "cuda" else "cpu: parameter + optimizer-state bytes "
        "+ peak of the profiler's allocation/free timeline over a plain and a meta step",
        "methods": {m.name: m.to_dict() for m in CORE_METHODS + LEVER_METHODS},
    }}
    for size in sizes:
        methods = list(CORE_METHODS) + (list(LEVER_METHODS) if size in lever_sizes else [])
        if args.methods:
            methods = [m for m in methods if m.name in args.methods or m.name == "adamw"]
        reps = args.reps if size not in args.reduced_sizes else max(3, args.reps // 2)
        results["sizes"][size] = measure_size(size, methods, reps, device, args.seed, not args.no_memory_profile,
                                              args.seq_len)
        results["sizes"][size]["reps"] = reps
        print(f"[{size}] " + ", ".join(
            f"{name} {entry['step_ratio']:.3f}x" for name, entry in results["sizes"][size]["methods"].items()
        ), file=sys.stderr, flush=True)
    add_headline(results)
    results["environment"] = finish_environment(info, started)
    return results


def size_result(size: str, methods, runners: list[Runner], param_b: int) -> dict:
    runners = {r.spec.name: r for r in runners}
    adamw = runners["adamw"]
    adamw_time = statistics.median(adamw.block_means)
    adamw_state = optimizer_state_bytes(adamw.optimizer, adamw.model)
    out = {
        "param_count": sum(p.numel() for p in adamw.model.parameters()),
        "param_bytes": param_b,
        "adamw_step_s": adamw_time,
        "factor_memory_over_params": factor_memory(size),
        "methods": {},
    }
    for spec in methods:
        runner = runners[spec.name]
        step_s = statistics.median(runner.block_means)
        state = optimizer_state_bytes(runner.optimizer, runner.model)
        entry = {
            "step_s": step_s,
            "step_ratio": step_s / adamw_time,
            "block_means_s": runner.block_means,
            "plain_step_median_s": statistics.median(runner.plain_times) if runner.plain_times else None,
            "state_bytes": state,
            "state_over_params": state / param_b,
            # persistent memory: parameters + gradients + optimizer state, over AdamW's
            "state_mem_ratio": (param_b * 2 + state) / (param_b * 2 + adamw_state),
        }
        # the breakdown times a meta step inside one step() call: not loss_batch "next" (spread over two calls)
        if spec.is_apo and runner.meta_times and spec.loss_batch == "same":
            meta = statistics.median(runner.meta_times)
            plain = statistics.median(runner.plain_times)
            entry["meta_step_median_s"] = meta
            entry["meta_step_in_adamw_steps"] = meta / statistics.median(adamw.plain_times)
            entry["plain_step_ratio"] = plain / statistics.median(adamw.plain_times)
            medians = {k: statistics.median(v) for k, v in runner.meta_parts.items() if v}
            step_s = medians.pop("optimizer_step")
            parts = {"training_forward_backward": meta - step_s}
            parts["target_forward"] = medians.get("target_forward", 0.0)
            parts["lookahead_forward_backward"] = medians.get("lookahead_forward_backward", 0.0)
            passes = parts["target_forward"] + parts["lookahead_forward_backward"]
            if "meta_update" in medians:  # APO-Precond
                parts["factor_graph_vjp_meta_adam"] = medians["meta_update"] - passes
                parts["preconditioned_update_and_rest"] = step_s - medians["meta_update"]
            else:  # APO-LR
                parts["base_update"] = medians.get("base_update", 0.0)
                parts["copies_dot_products_meta_adam_correction"] = step_s - passes - parts["base_update"]
            entry["meta_step_breakdown_s"] = parts
            entry["meta_step_breakdown_fraction"] = {k: v / meta for k, v in parts.items()}
        out["methods"][spec.name] = entry
    return out


def add_peaks(out: dict, peaks: dict[str, int | None], param_b: int) -> None:
    adamw_peak = peaks.get("adamw")
    for name, entry in out["methods"].items():
        peak = peaks.get(name)
        entry["peak_bytes"] = peak
        entry["peak_mem_ratio"] = (peak / adamw_peak) if peak and adamw_peak else None
        entry["peak_minus_adamw_over_params"] = ((peak - adamw_peak) / param_b) if peak and adamw_peak else None


def _get(methods: dict, name: str, key: str):
    """A method's measurement, or None where the method did not run (``--methods``)."""
    return methods.get(name, {}).get(key)


def _le(value, bound):
    return None if value is None else value <= bound


def add_headline(results: dict) -> None:
    """The top-level keys (tiny model) and per-size ratios, and the targets, met or not (None: not measured)."""
    sizes = results["sizes"]
    first = "tiny" if "tiny" in sizes else next(iter(sizes))
    tiny = sizes[first]["methods"]
    results["headline_size"] = first
    for name in ("apo_lr", "apo_precond"):
        results[f"{name}_step_ratio"] = _get(tiny, name, "step_ratio")
        results[f"{name}_peak_mem_ratio"] = _get(tiny, name, "peak_mem_ratio") or _get(tiny, name, "state_mem_ratio")
        results[f"{name}_state_mem_ratio"] = _get(tiny, name, "state_mem_ratio")
    results["per_size"] = {}
    targets = {}
    for size, entry in sizes.items():
        methods = entry["methods"]
        row = {
            "param_count": entry["param_count"],
            "apo_lr_step_ratio": _get(methods, "apo_lr", "step_ratio"),
            "apo_precond_step_ratio": _get(methods, "apo_precond", "step_ratio"),
            "apo_lr_peak_mem_ratio": _get(methods, "apo_lr", "peak_mem_ratio"),
            "apo_precond_peak_mem_ratio": _get(methods, "apo_precond", "peak_mem_ratio"),
            "second_order_peer_step_ratio": _get(methods, SECOND_ORDER_PEER, "step_ratio"),
        }
        for name, method in methods.items():
            row[f"{name}_step_ratio"] = method["step_ratio"]
            row[f"{name}_peak_mem_ratio"] = method["peak_mem_ratio"]
        results["per_size"][size] = row
        peer, precond = row["second_order_peer_step_ratio"], row["apo_precond_step_ratio"]
        extra = _get(methods, "apo_lr", "peak_minus_adamw_over_params")
        targets[size] = {
            "apo_lr_step_ratio_le_1.10": _le(row["apo_lr_step_ratio"], 1.10),
            "apo_precond_step_ratio_le_1.25": _le(precond, 1.25),
            "apo_precond_below_second_order_peer": (precond < peer) if peer and precond else None,
            "apo_precond_peak_le_2x_adamw": _le(row["apo_precond_peak_mem_ratio"], 2.0),
            "apo_lr_peak_le_adamw_plus_one_param_copy": _le(extra, 1.0),
            "apo_lr_peak_minus_adamw_in_param_copies": extra,
        }
    results["targets"] = targets
    results["targets_headline"] = targets[first]


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# APO overhead",
        "",
        f"Device: {env['device']} ({env['benchmark_device']}), torch {env['torch']}, {env['torch_threads']} threads; "
        f"load average at start {env['load_average_at_start']}, at end {env['load_average_at_end']}; "
        f"wall clock {env['wall_clock_s']} s.",
        f"Command: `{env['command']}`",
        "",
        f"Model: {results['settings']['model']}, vocabulary {VOCAB}, batch {BATCH}, "
        f"{results['settings']['seq_len']} tokens. Step time: "
        f"{results['settings']['timing']}. Peak memory: {results['settings']['peak_memory_method']}. "
        "Ratios are to AdamW in the same run.",
        "",
        "> " + env["contention_note"],
        "",
        "## Headline (" + results["headline_size"] + ")",
        "",
    ]
    t = results["targets_headline"]
    peer = results["per_size"][results["headline_size"]]["second_order_peer_step_ratio"]
    peer_text = f"{peer:.3g}" if peer is not None else "not run"
    precond_met = t["apo_precond_step_ratio_le_1.25"] and t["apo_precond_below_second_order_peer"] is not False
    lines.append(markdown_table(["quantity", "value", "target", "met"], [
        ["APO-LR step time / AdamW", results["apo_lr_step_ratio"], "≤ 1.10", _yes(t["apo_lr_step_ratio_le_1.10"])],
        ["APO-Precond step time / AdamW", results["apo_precond_step_ratio"],
         f"≤ 1.25 and below {SECOND_ORDER_PEER} ({peer_text})", _yes(precond_met)],
        ["APO-LR peak memory / AdamW", results["apo_lr_peak_mem_ratio"],
         "≤ AdamW + 1 copy of the parameters", _yes(t["apo_lr_peak_le_adamw_plus_one_param_copy"])],
        ["APO-LR peak − AdamW peak, in parameter copies", t["apo_lr_peak_minus_adamw_in_param_copies"], "≤ 1", ""],
        ["APO-Precond peak memory / AdamW", results["apo_precond_peak_mem_ratio"], "≤ 2",
         _yes(t["apo_precond_peak_le_2x_adamw"])],
    ]))
    lines += ["", "## Targets per size", ""]
    rows = []
    for size, t in results["targets"].items():
        row = results["per_size"][size]
        rows.append([size, row["param_count"], row["apo_lr_step_ratio"], _yes(t["apo_lr_step_ratio_le_1.10"]),
                     row["apo_precond_step_ratio"], row["second_order_peer_step_ratio"],
                     _yes(t["apo_precond_step_ratio_le_1.25"]), _yes(t["apo_precond_below_second_order_peer"]),
                     row["apo_lr_peak_mem_ratio"], t["apo_lr_peak_minus_adamw_in_param_copies"],
                     _yes(t["apo_lr_peak_le_adamw_plus_one_param_copy"]), row["apo_precond_peak_mem_ratio"],
                     _yes(t["apo_precond_peak_le_2x_adamw"])])
    lines.append(markdown_table(
        ["size", "params", "APO-LR step ×", "≤1.10", "APO-Precond step ×", f"{SECOND_ORDER_PEER} step ×", "≤1.25",
         "< peer", "APO-LR peak ×", "APO-LR extra peak (param copies)", "≤ +1 copy", "APO-Precond peak ×", "≤ 2"],
        rows))
    for size, entry in results["sizes"].items():
        lines += ["", f"## {size}: {entry['param_count']:,} parameters, AdamW step {entry['adamw_step_s'] * 1e3:.1f} ms, "
                  f"{entry['reps']} repetitions", ""]
        rows = []
        for name, m in entry["methods"].items():
            rows.append([name, m["step_s"] * 1e3, m["step_ratio"], m.get("plain_step_ratio"),
                         m.get("meta_step_in_adamw_steps"), m["peak_mem_ratio"], m["state_over_params"],
                         m["state_mem_ratio"]])
        lines.append(markdown_table(
            ["method", "step ms", "step ×AdamW", "plain step ×AdamW", "meta step (AdamW steps)", "peak mem ×AdamW",
             "state / params", "params+grads+state ×AdamW"], rows))
        for name in ("apo_lr", "apo_precond"):
            parts = entry["methods"].get(name, {}).get("meta_step_breakdown_fraction")
            if parts:
                lines.append("")
                lines.append(f"{name} meta step ({entry['methods'][name]['meta_step_median_s'] * 1e3:.1f} ms): " + ", ".join(
                    f"{k} {100 * v:.0f}%" for k, v in parts.items()))
        caps = entry["factor_memory_over_params"]
        lines.append("")
        lines.append("APO-Precond factor memory (factors + cached AAᵀ/BBᵀ + meta-Adam state) / parameter memory, "
                     "by max_factor_dim: " + ", ".join(f"{k[4:]}: {v:.2f}" for k, v in caps.items()))
    lines.append("")
    return "\n".join(lines)


def _yes(value) -> str:
    if value is None:
        return "—"
    return "yes" if value else "**no**"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (d64 model, 3 optimizers, 2 repetitions)")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "d256", "d512"], choices=list(SIZES))
    parser.add_argument("--lever_sizes", nargs="*", default=["tiny", "d256"], help="sizes that also run the levers")
    parser.add_argument("--reduced_sizes", nargs="*", default=["d256", "d512"],
                        help="sizes run with half the repetitions (at least 3)")
    parser.add_argument("--methods", nargs="+", default=None, help="restrict to these methods (AdamW always runs)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--seq_len", type=int, default=SEQ_LEN,
                        help=f"source and target tokens per example (batch {BATCH}; fine-tuning batches hold 2k-16k tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is available")
    parser.add_argument("--no_memory_profile", action="store_true", help="CPU: skip the profiler's peak memory")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps a shared machine's noise low; "
                        "2 threads on 2 busy cores can slow a step by 10-100x through OpenMP oversubscription)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.lever_sizes, args.reps, args.reduced_sizes = ["d64"], [], 2, []
        args.methods = args.methods or ["adamw", "apo_lr", "apo_lr_paper", "apo_precond"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    results = run(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.output_dir / "overhead.json", results)
    (args.output_dir / "overhead.md").write_text(markdown(results))
    print(f"wrote {args.output_dir / 'overhead.json'} and overhead.md", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
