"""The GPU's clocks, power and temperature while a benchmark runs, and why its clock was held down.

A step traced under torch.profiler runs slowly, on a cool GPU, while a sustained run may be capped by
power or heat: samples of the SM clock and the clock-event ("throttle") reasons, attributed to the
step kinds the caller marks, tell that apart from idle gaps (an idle GPU lowers its clock and says
`gpu_idle`) in the same run. Read only: nothing here changes a GPU setting.

    with GpuMonitor(nvml_id("cuda")) as mon:
        with mon.mark("decode"):
            ...
    mon.summary()  # per kind: samples, SM clock mean / min, power, temperature, reasons seen

The samples come from NVML through pynvml (package nvidia-ml-py) where it imports and finds the GPU,
else from `nvidia-smi -lms` in a subprocess, else from nothing (`available: False`: a CPU machine, CI).
"""
from __future__ import annotations

import bisect
import datetime
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from typing import NamedTuple

# NVML's nvmlClocksEventReason* bits (named nvmlClocksThrottleReason* before driver 535)
REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
           0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake",
           0x100: "display_clock_setting"}
# the timestamp attributes a sample by when it was read, whenever nvidia-smi's output reaches us
SMI_FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,{reasons}"
SMI_REASONS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")  # the new name, the old


class Sample(NamedTuple):
    t: float  # time.time() when read
    sm_mhz: float | None  # None: the GPU does not report it
    mem_mhz: float | None
    power_w: float | None  # NVML's power usage: on recent GPUs an average over the last second
    temp_c: float | None
    reasons: int | None  # the clock-event bitmask


def decode_reasons(mask: int) -> list[str]:
    """0x44 -> ['sw_power_cap', 'hw_thermal_slowdown']; a bit NVML has not named yet shows as hex."""
    bits = (1 << i for i in range(mask.bit_length()))
    return [REASONS.get(bit, hex(bit)) for bit in bits if mask & bit]


def parse_smi_line(line: str) -> Sample | None:
    """One line of `nvidia-smi --query-gpu=SMI_FIELDS --format=csv,noheader,nounits`, or None for
    anything else. Values the GPU does not report ('[N/A]', '[Not Supported]') read None."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 6:
        return None
    try:  # local time, as time.time() counts it
        t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return None

    def num(s: str, parse=float):
        try:
            return parse(s)
        except ValueError:
            return None

    return Sample(t, *(num(p) for p in parts[1:5]), num(parts[5], lambda s: int(s, 16)))


class NvmlSource:
    """Reads NVML every `interval_s` until closed."""
    name = "nvml"

    def __init__(self, device: int | str, interval_s: float):
        import pynvml

        pynvml.nvmlInit()
        try:
            self.nvml = pynvml
            self.handle = (pynvml.nvmlDeviceGetHandleByUUID(device.encode()) if isinstance(device, str)
                           else pynvml.nvmlDeviceGetHandleByIndex(device))
            # the first of the new getter and the old one that this driver answers
            getters = [getattr(pynvml, name) for name in ("nvmlDeviceGetCurrentClocksEventReasons",
                                                          "nvmlDeviceGetCurrentClocksThrottleReasons")
                       if hasattr(pynvml, name)]
            self._reasons = next((g for g in getters if self._get(g) is not None), getters[-1])
            self.read()  # a GPU NVML cannot read fails here, not in the sampling thread
        except Exception:
            pynvml.nvmlShutdown()
            raise
        self.interval_s = interval_s
        self._closed = threading.Event()

    def _get(self, fn, *args):
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError:  # not supported on this GPU (or in this VM)
            return None

    def read(self) -> Sample:
        n = self.nvml
        power_mw = self._get(n.nvmlDeviceGetPowerUsage)
        return Sample(time.time(), self._get(n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_SM),
                      self._get(n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_MEM),
                      None if power_mw is None else power_mw / 1e3,
                      self._get(n.nvmlDeviceGetTemperature, n.NVML_TEMPERATURE_GPU), self._get(self._reasons))

    def __iter__(self):
        try:
            while not self._closed.wait(self.interval_s):
                yield self.read()
        finally:
            self.nvml.nvmlShutdown()

    def close(self) -> None:
        self._closed.set()


class SmiSource:
    """`nvidia-smi --query-gpu=... -lms`: a line per sample until closed."""
    name = "nvidia-smi"

    def __init__(self, device: int | str, interval_s: float):
        exe = shutil.which("nvidia-smi")
        if exe is None:
            raise FileNotFoundError("nvidia-smi not found")
        for reasons in SMI_REASONS:  # the first field name this nvidia-smi knows
            cmd = [exe, f"--query-gpu={SMI_FIELDS.format(reasons=reasons)}", "--format=csv,noheader,nounits",
                   "-i", str(device)]
            probe = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if probe.returncode == 0 and parse_smi_line(probe.stdout):
                break
        else:
            raise RuntimeError(" ".join((probe.stdout + probe.stderr).split())[:200])
        self.proc = subprocess.Popen(cmd + ["-lms", str(round(1e3 * interval_s))], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)

    def __iter__(self):
        with self.proc.stdout as lines:  # ends when close() stops the process
            for line in lines:
                sample = parse_smi_line(line)
                if sample is not None:
                    yield sample

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)  # as Ctrl+C ends `-lms`: what it holds buffered still comes out
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def nvml_id(device) -> str | None:
    """The UUID NVML and nvidia-smi know a torch device by (CUDA's order of devices, and
    CUDA_VISIBLE_DEVICES, need not be theirs); None off CUDA."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def open_source(device: int | str | None, interval_s: float):
    """(NVML, else nvidia-smi, else None; why the ones tried failed)."""
    if device is None:
        return None, "not a CUDA device"
    errors = []
    for source in (NvmlSource, SmiSource):
        try:
            return source(device, interval_s), None
        except Exception as e:  # noqa: BLE001 - no pynvml, no driver, no such GPU: the next one, or none
            errors.append(f"{source.name}: {type(e).__name__}: {e}")
    return None, "; ".join(errors)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


def stats(samples: list[Sample]) -> dict:
    """What the table shows of some samples; `reasons` counts the samples that named each reason."""
    def col(name):
        return [v for v in (getattr(s, name) for s in samples) if v is not None]

    sm, temp = col("sm_mhz"), col("temp_c")
    reasons = Counter(r for s in samples if s.reasons for r in decode_reasons(s.reasons))
    return {"samples": len(samples), "sm_mhz_mean": _mean(sm), "sm_mhz_min": min(sm, default=None),
            "mem_mhz_mean": _mean(col("mem_mhz")), "power_w_mean": _mean(col("power_w")),
            "temp_c_max": max(temp, default=None), "reasons": dict(reasons.most_common())}


class GpuMonitor:
    """Samples a GPU in a thread while `with GpuMonitor(device) as mon:` runs; `with mon.mark(kind):`
    attributes the samples read inside it to `kind` (by their read time, so a late-arriving sample
    still counts where it was taken). `device`: an NVML index or UUID (`nvml_id`), None for none.
    `source` (an iterable of `Sample`s, with an optional `close()`) and `clock` replace the GPU's
    and time.time, for tests; `drain()` is the thread's loop."""

    def __init__(self, device: int | str | None = 0, interval_s: float = 0.1, source=None, clock=time.time):
        self.device, self.interval_s, self.source, self.clock = device, interval_s, source, clock
        self.error: str | None = None
        self.samples: list[Sample] = []
        self.marks: list[tuple[float, str | None]] = []  # (time, kind from then on)
        self.kind: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.source is not None

    def __enter__(self) -> GpuMonitor:
        if self.source is None:
            self.source, self.error = open_source(self.device, self.interval_s)
        if self.source is not None:
            self._thread = threading.Thread(target=self.drain, name="gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            if hasattr(self.source, "close"):
                self.source.close()
            self._thread.join(timeout=10)
            self._thread = None

    def drain(self) -> None:
        """Keep the source's samples until it ends; a failing read ends it (the summary says why):
        the benchmark goes on without its monitor."""
        try:
            for sample in self.source:
                self.samples.append(sample)
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"

    @contextmanager
    def mark(self, kind: str):
        outer = self.kind
        self._switch(kind)
        try:
            yield
        finally:
            self._switch(outer)

    def _switch(self, kind: str | None) -> None:
        self.kind = kind
        self.marks.append((self.clock(), kind))

    def kind_at(self, t: float) -> str | None:
        i = bisect.bisect_right(self.marks, t, key=lambda m: m[0])
        return self.marks[i - 1][1] if i else None

    def during(self, t0: float, t1: float) -> dict:
        """`stats` of the samples read between two readings of `clock`."""
        return stats([s for s in self.samples if t0 <= s.t <= t1])

    def summary(self) -> dict:
        """JSON-ready: `all` the samples, and per marked kind (`kinds`) those read inside its marks."""
        if not self.available:
            return {"available": False, "error": self.error}
        by_kind = defaultdict(list)
        for s in self.samples:
            kind = self.kind_at(s.t)
            if kind is not None:
                by_kind[kind].append(s)
        out = {"available": True, "source": getattr(self.source, "name", type(self.source).__name__),
               "interval_s": self.interval_s, "all": stats(self.samples),
               "kinds": {kind: stats(v) for kind, v in sorted(by_kind.items())}}
        if self.error:
            out["error"] = self.error
        return out


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:g}"


def _reasons(s: dict) -> str:
    return ", ".join(f"{r} {n}" for r, n in s["reasons"].items())


def brief(s: dict) -> str:
    """One `stats` in a line."""
    if not s["samples"]:
        return "no GPU sample"
    return (f"SM {_num(s['sm_mhz_mean'])} MHz (min {_num(s['sm_mhz_min'])}), {_num(s['power_w_mean'])} W, "
            f"{s['samples']} samples; clock events: {_reasons(s) or 'none'}")


def table(summary: dict, all_label: str = "all samples") -> str:
    """A markdown table of a summary: a row per kind, then one of all the samples."""
    if not summary["available"]:
        return f"no GPU monitor: {summary['error']}"
    lines = ["| step kind | samples | SM MHz mean | SM MHz min | memory MHz | power W | max temp C "
             "| clock event reasons (samples) |", "| --- |" + " --- |" * 7]
    for kind, s in [*summary["kinds"].items(), (all_label, summary["all"])]:
        cells = [s[k] for k in ("sm_mhz_mean", "sm_mhz_min", "mem_mhz_mean", "power_w_mean", "temp_c_max")]
        lines.append(f"| {kind} | {s['samples']} | " + " | ".join(map(_num, cells)) + f" | {_reasons(s)} |")
    if "error" in summary:
        lines.append(f"\nthe monitor stopped early: {summary['error']}")
    return "\n".join(lines)
