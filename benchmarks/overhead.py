"""What APO costs: step time and peak memory against AdamW and the peers (``python -m benchmarks run overhead``; sizes
and methods in ``studies/overhead/study.toml``). A run writes one JSON record into its runs/, ``report`` renders them
all. The meta step's parts come from the optimizers' profiler regions, their state from ``memory_usage()``."""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import optimizers, runner
from benchmarks.report import table

SIZES = {"d64": (64, 256, 2), "tiny": (128, 512, 4), "d256": (256, 1024, 8), "d512": (512, 2048, 8),
         "d1024": (1024, 4096, 16)}  # d_model, d_ff, heads (T5 convention d_ff = 4·d_model)
VOCAB, BATCH = 1000, 32  # the T5's; a study may set ``batch``
COLUMNS = ["method", "step ms", "step ×AdamW", "plain step ×AdamW", "meta step (AdamW steps)", "peak ×AdamW",
           "state / params", "params+grads+state ×AdamW"]


def build_model(size: str, device: str):
    """A model of the study: ``minilm`` (the bert2bert of ui_strings_fr_pretrained, 49M parameters, a 30k
    vocabulary) or a T5 (2 + 2 layers, tied embeddings, vocabulary 1000) of one of :data:`SIZES`."""
    if size == "minilm":
        from benchmarks.tasks import ui_strings_fr_pretrained

        return ui_strings_fr_pretrained.build_model(0).to(device)
    from transformers import T5Config, T5ForConditionalGeneration

    d_model, d_ff, heads = SIZES[size]
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=2, num_decoder_layers=2,
        num_heads=heads, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        tie_word_embeddings=True)).to(device)


def state_bytes(optimizer) -> int:
    """What the optimizer keeps between steps: ``memory_usage()`` where it reports it, else its state's tensors."""
    if hasattr(optimizer, "memory_usage"):
        return sum(optimizer.memory_usage().values())
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


class Runner:
    """One optimizer on its own copy of the model: its step times, and its meta steps' profiled parts."""

    def __init__(self, name: str, method: dict, model, batches, device: str, steps: int):
        self.name, self.batches, self.device, self.steps = name, batches, device, 0
        self.model = model.train()
        full = optimizers.resolve({k: v for k, v in method.items() if k != "lr"})
        ctx = optimizers.Context(self.model, list(self.model.parameters()), total_steps=steps)
        self.optimizer, self.scheduler = optimizers.build(full, method["lr"], ctx)
        self.block = full.get("meta_interval") or 10
        self.plain, self.meta, self.block_means, self.parts = [], [], [], {}

    def step(self) -> float:
        batch = self.batches[self.steps % len(self.batches)]
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        runner.train_step(self.model, self.optimizer, batch, lambda m, b: m(**b), self.scheduler)
        sync()
        self.steps += 1
        return time.perf_counter() - start

    def meta_steps(self) -> int:  # the innermost APO optimizer's (APO-Precond's under the APO-LR learning its size)
        optimizer = self.optimizer
        while getattr(optimizer, "inner", None) is not None:
            optimizer = optimizer.inner
        return getattr(optimizer, "meta_steps", 0)

    def run_block(self, record: bool = True) -> None:
        times = []
        for _ in range(self.block):
            before = self.meta_steps()
            times.append(self.step())
            if record:
                (self.meta if self.meta_steps() > before else self.plain).append(times[-1])
        if record:
            self.block_means.append(statistics.fmean(times))

    def profile_meta_step(self) -> None:
        """The regions the optimizer marks (apo/meta_step, apo/base_step), over one meta period, in seconds."""
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.run_block(record=False)
        for event in prof.key_averages():
            if event.key.startswith("apo/"):
                self.parts[event.key[4:]] = event.cpu_time_total / 1e6


def peak_bytes(run: Runner) -> int | None:
    """Peak bytes over a plain and a meta step: CUDA's allocator statistics, or on CPU the bytes alive before the
    window plus the peak of the profiler's allocation/free timeline."""
    before = sum(p.numel() * p.element_size() for p in run.model.parameters()) + state_bytes(run.optimizer)
    for _ in range(run.block - 2 - run.steps % run.block):
        run.step()
    if run.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run.step(), run.step()
        return torch.cuda.max_memory_allocated() - start + before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run.step(), run.step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return before + peak if events else None


def measure(size: str, methods: dict, reps: int, device: str, seq_len: int, batch: int = BATCH,
            skip: int = 0) -> dict:
    """Each method on its own copy of the model, on the same random-token batches; ``skip`` untimed steps first
    (past an opening that costs more than the steady state, e.g. the trust region's)."""
    models = [build_model(size, device) for _ in methods]
    generator, vocab = torch.Generator().manual_seed(0), models[0].get_output_embeddings().weight.shape[0]
    tokens = [torch.randint(2, vocab, (batch, seq_len), generator=generator) for _ in range(8)]
    batches = [{"input_ids": t.to(device), "attention_mask": torch.ones_like(t).to(device),
                "labels": t.flip(1).to(device)} for t in tokens]
    runs = [Runner(name, m, model, batches, device, skip + (reps + 4) * 16)
            for (name, m), model in zip(methods.items(), models)]
    for r in runs:
        for _ in range(skip):
            r.step()
    peaks = {r.name: peak_bytes(r) for r in runs}
    for r in runs:
        r.run_block(record=False)
        r.profile_meta_step()
    for rep in range(reps):  # round-robin, the order rotated every repetition
        for r in runs[rep % len(runs):] + runs[:rep % len(runs)]:
            r.run_block()
    adamw = runs[0]
    param_bytes = sum(p.numel() * p.element_size() for p in adamw.model.parameters())
    adamw_step, adamw_plain = statistics.median(adamw.block_means), statistics.median(adamw.plain)
    out = {"param_count": sum(p.numel() for p in adamw.model.parameters()), "param_bytes": param_bytes,
           "adamw_step_s": adamw_step, "reps": reps, "batch": batch, "skipped_steps": skip, "methods": {}}
    for r in runs:
        state, step = state_bytes(r.optimizer), statistics.median(r.block_means)
        entry = {"step_s": step, "step_ratio": step / adamw_step, "block_means_s": r.block_means,
                 "plain_step_ratio": statistics.median(r.plain) / adamw_plain, "state_bytes": state,
                 "state_over_params": state / param_bytes,
                 "state_mem_ratio": (2 * param_bytes + state) / (2 * param_bytes + state_bytes(adamw.optimizer)),
                 "peak_bytes": peaks[r.name], "peak_mem_ratio": peaks[r.name] / peaks[adamw.name]
                 if peaks[r.name] and peaks[adamw.name] else None}
        if r.meta:
            entry["meta_step_in_adamw_steps"] = statistics.median(r.meta) / adamw_plain
            entry["meta_step_parts_s"] = r.parts
        out["methods"][r.name] = entry
    del runs
    gc.collect()
    return out


def run(study: str, output: Path | None, quick: bool) -> Path:
    config = runner.load_config(study)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes, reps = (["d64"], 2) if quick else (config["sizes"], config["reps"])
    methods = dict(list(config["methods"].items())[:4] if quick else config["methods"].items())  # AdamW first
    batch, skip, started = config.get("batch", BATCH), 0 if quick else config.get("skip", 0), time.perf_counter()
    record = {"environment": {**runner.environment(), "benchmark_device": device, "load_average_at_start":
                              list(os.getloadavg())},
              "settings": {"seq_len": config["seq_len"], "batch": batch, "reps": reps, "skip": skip,
                           "methods": methods}, "sizes": {}}
    for size in sizes:
        record["sizes"][size] = measure(size, methods, reps, device, config["seq_len"], batch, skip)
    record["environment"]["wall_clock_s"] = round(time.perf_counter() - started, 1)
    path = Path(output or runner.STUDIES / study / "runs") / f"{device}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def report(study: str, runs: Path | None = None, output: Path | None = None) -> Path:
    """report.md: for every record in runs/, per size, each method's step time and memory against AdamW's."""
    config, runs = runner.load_config(study), Path(runs or runner.STUDIES / study / "runs")
    lines = [f"# {config['title']}", "", config["question"].strip(), "",
             f"Generated by `python -m benchmarks report {study}` from `runs/`.", ""]
    for path in sorted(runs.glob("*.json")):
        record = json.loads(path.read_text())
        env = record["environment"]
        lines += [f"## {path.stem}", "", f"{env.get('device')} ({env.get('benchmark_device', 'cpu')}), torch "
                  f"{env.get('torch')}, {env.get('torch_threads', env.get('threads'))} threads, "
                  f"batch {record['settings'].get('batch', BATCH)} × {record['settings'].get('seq_len', 16)} "
                  f"tokens" + (f", timed after {record['settings']['skip']} steps" if record["settings"].get("skip")
                               else "") + f"; wall clock {env.get('wall_clock_s')} s"
                  + (f"; `{env['command']}`" if env.get("command") else "") + ".", ""]
        for size, entry in record["sizes"].items():
            rows = [[name] + ["—" if c is None else f"{c:.4g}" for c in (
                m["step_s"] * 1e3, m["step_ratio"], m.get("plain_step_ratio"), m.get("meta_step_in_adamw_steps"),
                m.get("peak_mem_ratio"), m["state_over_params"], m["state_mem_ratio"])]
                for name, m in entry["methods"].items()]
            lines += [f"### {size}: {entry['param_count']:,} parameters, AdamW step "
                      f"{entry['adamw_step_s'] * 1e3:.1f} ms", "", *table(COLUMNS, rows), ""]
    path = Path(output or runner.STUDIES / study) / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
