"""Where an engine step's time goes: `python -m lowbit.bench profile [--arch A] [--recipe R] ...`.

Runs one offline workload on random weights (as `e2e` does) with the GPU synchronized around each
phase of every step, and prints per step kind (decode-only through the CUDA graph, or mixed/prefill
through the eager forward) the mean milliseconds spent scheduling, building the batch on the host,
in the forward (GPU included), sampling, and updating requests; then torch.profiler's top kernels
over a few steps of each kind, the host functions (cProfile) of a few unsynchronized steps, and
every operation that made the host wait for the GPU inside one step of each kind (torch's sync
debug mode: a step should have exactly one, the read-back of its tokens), the caching allocator's
calls into the driver per step (a cudaFree synchronizes the device; the sync debug mode does not
see it) and where they come from; then the GPU's clocks, power and clock-event ("throttle") reasons
sampled during the forwards of each kind and during the traced steps (`gpu_monitor`), which tell a
power- or heat-capped clock from idle gaps. The synchronization costs a little overlap, so these are shares of a
step, not a throughput figure (that is `e2e`'s job). The loop runs synchronously (no asynchronous
scheduling), so the host phases are the costs that asynchronous scheduling overlaps with the device.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

PHASES = ("schedule", "host_batch", "forward", "sample", "update")
RUNNER_PHASES = ("host_batch", "sample")  # engine.model_runner functions timed as phases of a step
# caching-allocator events that reach the driver: a cudaMalloc, a cudaFree (which synchronizes the
# device), a retry after freeing cached blocks; none of them shows in the sync debug mode
ALLOC_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def allocator_counts(device) -> dict[str, int]:
    import torch

    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: stats.get(k, 0) for k in ALLOC_COUNTS}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lowbit.bench profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama3-8b")
    p.add_argument("--recipe", default="w4a8kv4", help="a recipe name, or bf16")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--time-limit-s", type=float, default=60.0, help="stop the timed run after this long")
    p.add_argument("--trace-steps", type=int, default=3, help="steps of each kind under torch.profiler")
    p.add_argument("--host-steps", type=int, default=5, help="unsynchronized steps under cProfile, after the timed run")
    p.add_argument("--device", default="cuda")
    return p


def host_profile(step, steps: int, top: int = 25) -> str:
    """cProfile of `steps` calls of `step`: the `top` functions by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def host_waits(step) -> list[str]:
    """Where `step` made the host wait for the device: one line per synchronizing call, its
    innermost frames in our code (torch's sync debug mode warns on each)."""
    import traceback
    import warnings

    import torch

    found = []

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "lowbit" in f.filename][-3:]
        found.append(f"{str(message).splitlines()[0][:60]} at " + " <- ".join(
            f"{f.filename.split('lowbit/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames)))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    return found


def driver_calls(step, steps: int) -> list[str]:
    """The caching allocator's calls into the driver over `steps` calls of `step`, with torch's
    allocator history: each segment allocated or freed (cudaMalloc / cudaFree, or an expandable
    segment's map / unmap), its size and the innermost frames in our code, counted by site."""
    from collections import Counter

    import torch

    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    sites = Counter()
    for trace in snapshot["device_traces"]:
        for e in trace:
            if e["action"] in ("segment_alloc", "segment_free", "segment_map", "segment_unmap"):
                frames = [f for f in e.get("frames", []) if "lowbit" in f["filename"]][:3]
                where = " <- ".join(f"{f['filename'].split('lowbit/')[-1]}:{f['line']} {f['name']}" for f in frames)
                sites[f"{e['action']} {e['size'] / 2**20:.0f} MiB at {where or '?'}"] += 1
    return [f"{n} x {site}" for site, n in sites.most_common()]


class StepTimer:
    """Accumulates synchronized wall time per (step kind, phase). A step's phases are held until
    `end_step`, which files them under the kind its forward named: the scheduling phase runs
    before the kind is known. Nothing is recorded while `enabled` is False (traced or host-profiled steps)."""

    def __init__(self, device):
        import torch

        self.device = device
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.ms: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.steps: dict[str, int] = defaultdict(int)
        self.alloc: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.kind = "?"
        self.enabled = True
        self._ms: dict[str, float] = defaultdict(float)  # the current step's
        self._alloc: dict[str, int] = defaultdict(int)

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self._ms[name] += 1e3 * (time.perf_counter() - t0)

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            with self.phase(name):
                return fn(*a, **k)

        setattr(obj, attr, timed)

    def count_allocs(self, before: dict[str, int], after: dict[str, int]) -> None:
        """Add the allocator's device-level events between two `allocator_counts` to the current step."""
        for key in ALLOC_COUNTS:
            self._alloc[key] += after.get(key, 0) - before.get(key, 0)

    def end_step(self) -> None:
        """File the current step's phases and allocator events under `kind`."""
        if self.enabled:
            self.steps[self.kind] += 1
            for name, ms in self._ms.items():
                self.ms[self.kind][name] += ms
            for key, n in self._alloc.items():
                self.alloc[self.kind][key] += n
        self._ms.clear()
        self._alloc.clear()

    def alloc_table(self) -> str:
        lines = ["| step kind | " + " | ".join(f"{k} / step" for k in ALLOC_COUNTS) + " |",
                 "| --- |" + " --- |" * len(ALLOC_COUNTS)]
        for kind, n in sorted(self.steps.items()):
            lines.append(f"| {kind} | " + " | ".join(f"{self.alloc[kind][k] / n:.2f}" for k in ALLOC_COUNTS) + " |")
        return "\n".join(lines)

    def table(self) -> str:
        lines = ["| step kind | steps | " + " | ".join(f"{p} ms" for p in PHASES) + " | total ms |",
                 "| --- | --- |" + " --- |" * (len(PHASES) + 1)]
        for kind, n in sorted(self.steps.items()):
            per = [self.ms[kind][p] / n for p in PHASES]
            lines.append(f"| {kind} | {n} | " + " | ".join(f"{v:.2f}" for v in per) + f" | {sum(per):.2f} |")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from lowbit.api import LLM
    from lowbit.bench import gpu_monitor
    from lowbit.bench.throughput import random_requests
    from lowbit.engine import model_runner
    from lowbit.models.random_weights import random_config
    from lowbit.sampling_params import SamplingParams

    a = _parser().parse_args(argv)
    llm = LLM(random_weights=a.arch, recipe=None if a.recipe == "bf16" else a.recipe, device=a.device,
              max_model_len=a.input_len + a.output_len, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens, async_scheduling=False)
    engine = llm.engine
    vocab = random_config(a.arch).vocab_size

    def submit(num, input_len, output_len, seed):
        for prompt, n in random_requests(num, input_len, output_len, 0.0, vocab, seed):
            engine.add_request(prompt, SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True),
                               stream=False)  # as `throughput` does: outputs only when finished

    submit(min(a.max_num_seqs, 256), 24, 8, 1)  # warm-up: compiles kernels, captures the graphs it meets
    while engine.has_unfinished_requests():
        engine.step()

    timer = StepTimer(torch.device(a.device))
    timer.wrap(engine.scheduler, "schedule", "schedule")
    for attr in RUNNER_PHASES:
        timer.wrap(model_runner, attr, attr)
    runner = engine.runner
    launch = runner.launch
    monitor = gpu_monitor.GpuMonitor(gpu_monitor.nvml_id(timer.device))

    def classified(batch):
        decode = all(item.num_tokens == 1 for item in batch)
        timer.kind = f"decode b{len(batch) // 64 * 64}-{len(batch) // 64 * 64 + 63}" if decode else "mixed/prefill"
        mark = monitor.mark(timer.kind) if timer.enabled else nullcontext()  # a traced step has its own
        with mark, timer.phase("forward"):  # the mark spans the phase's closing sync; minus the nested phases, below
            return launch(batch)

    runner.launch = classified
    submit(a.num_prompts, a.input_len, a.output_len, 2)
    start, traced = time.perf_counter(), defaultdict(int)
    prof = a.device != "cpu"
    with monitor:
        while engine.has_unfinished_requests() and time.perf_counter() - start < a.time_limit_s:
            t0 = time.perf_counter()
            batch_kind = None
            if prof:
                pending = engine.scheduler
                decode_now = bool(pending.running) and not pending.waiting and all(
                    s.num_uncomputed == 1 for s in pending.running)
                batch_kind = "decode" if decode_now else "mixed"
            trace = prof and traced[batch_kind] < a.trace_steps and time.perf_counter() - start > 2
            if trace:
                traced[batch_kind] += 1
                timer.enabled = False
                m0 = monitor.clock()
                with monitor.mark(f"traced {batch_kind}"), \
                        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
                    engine.step()
                timer.enabled = True
                print(f"\n## kernels, one {batch_kind} step ({1e3 * (time.perf_counter() - t0):.1f} ms wall; "
                      f"{gpu_monitor.brief(monitor.during(m0, monitor.clock()))})")
                print(p.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
                continue
            before = allocator_counts(timer.device)
            with timer.phase("update"):
                engine.step()
            timer.count_allocs(before, allocator_counts(timer.device))
            timer.end_step()
    timer.enabled = False  # the phases' syncs would be counted as waits
    if prof and engine.has_unfinished_requests():
        waits = host_waits(engine.step)
        print(f"\n## host waits for the GPU in one step after the timed run: {len(waits)}")
        print("\n".join(f"- {w}" for w in waits))
        print(f"\n## host functions over the {a.host_steps} unsynchronized steps after it (cProfile)\n")
        print(host_profile(engine.step, a.host_steps))
        submit(8, a.input_len, a.output_len, 3)  # new prompts beside the running decodes: a mixed step
        waits = host_waits(engine.step)
        print(f"\n## host waits for the GPU in one mixed step: {len(waits)}")
        print("\n".join(f"- {w}" for w in waits))
        submit(8, a.input_len, a.output_len, 4)
        print("\n## host functions over one mixed step, synchronized at its end (cProfile)\n")
        print(host_profile(lambda: (engine.step(), torch.cuda.synchronize()), 1))
        calls = driver_calls(engine.step, a.host_steps)
        print(f"\n## the allocator's calls into the driver over the next {a.host_steps} steps: {len(calls)} sites\n")
        print("\n".join(f"- {c}" for c in calls))
    for rid in list(engine.requests):
        engine.abort_request(rid)
    # "update" held the whole step: take the nested phases out of it, and the sampling out of forward
    for kind, ms in timer.ms.items():
        ms["forward"] -= ms["sample"] + ms["host_batch"]
        ms["update"] -= ms["schedule"] + ms["forward"] + ms["sample"] + ms["host_batch"]
    print(f"\n## {a.arch} {a.recipe} {a.input_len}/{a.output_len}, {a.num_prompts} prompts, "
          f"max_num_seqs {a.max_num_seqs}: mean ms per step (synchronized)\n")
    print(timer.table())
    if prof:
        print("\n## the caching allocator's calls into the driver, mean per step\n")
        print(timer.alloc_table())
        print(f"\n## GPU clocks and power per step kind (sampled every {1e3 * monitor.interval_s:.0f} ms during "
              "the forwards of the timed steps; traced: whole steps under torch.profiler)\n")
        print(gpu_monitor.table(monitor.summary(), all_label="whole timed run"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
