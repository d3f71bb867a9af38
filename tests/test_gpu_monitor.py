"""The GPU monitor's bookkeeping without a GPU: nvidia-smi's lines, the clock-event bitmask, samples
attributed to the marked step kinds (an injected source and clock, no timing), and the no-GPU path."""
import datetime
import json
import time

import pytest

from lowbit.bench import gpu_monitor
from lowbit.bench.gpu_monitor import GpuMonitor, Sample, decode_reasons, parse_smi_line


def smi_line(t: float, rest: str) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3] + ", " + rest + "\n"


def test_parse_smi_line():
    t = datetime.datetime(2026, 11, 20, 10, 0, 0, 250000).timestamp()
    s = parse_smi_line("2026/11/20 10:00:00.250, 1410, 3201, 650.12, 71, 0x0000000000000004\n")
    assert s == Sample(t, 1410, 3201, 650.12, 71, 4)
    assert decode_reasons(s.reasons) == ["sw_power_cap"]
    # what the GPU does not report reads None; anything but a sample line is skipped
    assert parse_smi_line(smi_line(t, "345, 3201, [N/A], 40, [Not Supported]")) == Sample(t, 345, 3201, None, 40, None)
    for line in ("", "timestamp, clocks.current.sm [MHz], ...", "1410, 3201, 650.12, 71, 0x4",
                 "Failed to initialize NVML: Driver/library version mismatch"):
        assert parse_smi_line(line) is None


def test_decode_reasons():
    assert decode_reasons(0) == []
    assert decode_reasons(0x1) == ["gpu_idle"]
    assert decode_reasons(0x44) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert decode_reasons(0x8 | 0x20 | 0x80) == ["hw_slowdown", "sw_thermal_slowdown", "hw_power_brake"]
    assert decode_reasons(0x2 | 0x10 | 0x1000) == ["applications_clocks", "sync_boost", "0x1000"]


def sample(t, sm, power=500.0, temp=60, reasons=0):
    return Sample(t, sm, 2619, power, temp, reasons)


def test_samples_go_to_the_kind_marked_when_they_were_read():
    """The thread's loop (`drain`) run inline over a source that yields while the marks are open:
    a sample belongs to the kind marked at its read time, whenever it arrives."""
    clock = iter(range(100))
    mon = GpuMonitor(source=[], clock=lambda: next(clock))

    def source():
        yield sample(-0.5, 1980, reasons=0x1)  # read before the first mark (at clock 0)
        with mon.mark("mixed"):  # t 0 .. 1
            yield sample(0.7, 1500, power=690, temp=70, reasons=0x4)
            with mon.mark("traced mixed"):  # t 1 .. 2: the outer kind again after it
                yield sample(1.5, 1980, power=400, temp=60)
            yield sample(2.5, 1400, power=700, temp=72, reasons=0x4 | 0x40)
        yield sample(3.5, 1000, reasons=0x1)  # after the marks: in `all` only
        with mon.mark("decode b0-63"):  # t 4 .. 5
            pass
        yield sample(4.2, 1755, reasons=None)  # read inside the mark, arrived after it

    mon.source = source()
    mon.drain()
    assert mon.marks == [(0, "mixed"), (1, "traced mixed"), (2, "mixed"), (3, None), (4, "decode b0-63"), (5, None)]
    got = mon.summary()
    assert got["available"] and got["source"] == "generator" and "error" not in got
    kinds = got["kinds"]
    assert list(kinds) == ["decode b0-63", "mixed", "traced mixed"]
    assert kinds["mixed"] == {"samples": 2, "sm_mhz_mean": 1450.0, "sm_mhz_min": 1400, "mem_mhz_mean": 2619.0,
                              "power_w_mean": 695.0, "temp_c_max": 72,
                              "reasons": {"sw_power_cap": 2, "hw_thermal_slowdown": 1}}
    assert kinds["traced mixed"]["sm_mhz_mean"] == 1980.0 and kinds["traced mixed"]["reasons"] == {}
    assert kinds["decode b0-63"]["samples"] == 1
    assert got["all"]["samples"] == 6 and got["all"]["reasons"] == {"sw_power_cap": 2, "gpu_idle": 2,
                                                                   "hw_thermal_slowdown": 1}
    assert mon.during(0.6, 2.0)["samples"] == 2
    assert json.loads(json.dumps(got)) == got
    table = gpu_monitor.table(got, all_label="whole run").splitlines()
    assert table[0].startswith("| step kind | samples | SM MHz mean | SM MHz min |")
    assert table[3] == "| mixed | 2 | 1450 | 1400 | 2619 | 695 | 72 | sw_power_cap 2, hw_thermal_slowdown 1 |"
    assert table[-1].startswith("| whole run | 6 | ")
    assert gpu_monitor.brief(kinds["traced mixed"]) == "SM 1980 MHz (min 1980), 400 W, 1 samples; clock events: none"


def test_a_failing_source_ends_the_sampling_not_the_run():
    def source():
        yield sample(0.0, 1980)
        raise RuntimeError("NVML lost the GPU")

    mon = GpuMonitor(source=source())
    mon.drain()
    got = mon.summary()
    assert got["all"]["samples"] == 1 and got["error"] == "RuntimeError: NVML lost the GPU"
    assert "stopped early: RuntimeError" in gpu_monitor.table(got)


def test_the_thread_stops_when_the_block_ends():
    """The source is closed on exit (as nvidia-smi's process and NVML's poll are) and the thread joined."""
    class Endless:
        closed = False

        def __iter__(self):
            while not self.closed:
                time.sleep(1e-3)
                yield sample(0.0, 1980)

        def close(self):
            self.closed = True

    source = Endless()
    with GpuMonitor(source=source) as mon:
        pass
    assert source.closed and mon._thread is None and mon.summary()["source"] == "Endless"


def test_no_gpu_is_unavailable_and_quiet(monkeypatch):
    with GpuMonitor(None) as mon, mon.mark("decode"):
        pass
    assert mon.summary() == {"available": False, "error": "not a CUDA device"}
    assert gpu_monitor.table(mon.summary()) == "no GPU monitor: not a CUDA device"
    assert gpu_monitor.nvml_id("cpu") is None
    # a GPU index on a machine without pynvml's library or nvidia-smi: both tried, neither raises
    monkeypatch.setattr(gpu_monitor.shutil, "which", lambda name: None)
    with GpuMonitor(0) as mon:
        pass
    got = mon.summary()
    assert not got["available"] and "nvml: " in got["error"] and "nvidia-smi: FileNotFoundError" in got["error"]


@pytest.mark.parametrize("new_name", [True, False])
def test_nvidia_smi_field_names_old_and_new(monkeypatch, new_name):
    """The first field name this nvidia-smi accepts (clocks_event_reasons: newer drivers;
    clocks_throttle_reasons: older) is the one the sampling process queries."""
    import subprocess

    calls, started = [], []

    def run(cmd, **kw):
        calls.append(cmd)
        ok = ("clocks_event_reasons.active" in cmd[1]) == new_name
        out = smi_line(0.0, "1980, 2619, 120.5, 35, 0x0000000000000001") if ok else ""
        return subprocess.CompletedProcess(cmd, 0 if ok else 2, out, "" if ok else "Field is not a valid field")

    monkeypatch.setattr(gpu_monitor.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpu_monitor.subprocess, "run", run)
    monkeypatch.setattr(gpu_monitor.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    source = gpu_monitor.SmiSource("GPU-1234", 0.1)
    field = "clocks_event_reasons.active" if new_name else "clocks_throttle_reasons.active"
    assert len(calls) == (1 if new_name else 2) and source.name == "nvidia-smi"
    assert started == [["/usr/bin/nvidia-smi", f"--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,"
                        f"temperature.gpu,{field}", "--format=csv,noheader,nounits", "-i", "GPU-1234", "-lms", "100"]]


def test_nvml_source_reads_what_the_gpu_reports(monkeypatch):
    """pynvml's names, its units (mW) and a refused read (None); an older driver lacks the
    clocks-event getter, whose old name (throttle reasons) then reads the same bits."""
    import sys
    import types

    class NVMLError(Exception):
        pass

    calls = []

    def refuse(*a):
        raise NVMLError("Function Not Found")

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByUUID=lambda uuid: calls.append(uuid) or "handle",
        nvmlDeviceGetClockInfo=lambda h, clock: {1: 1980, 2: 2619}[clock],
        nvmlDeviceGetPowerUsage=refuse, nvmlDeviceGetTemperature=lambda h, sensor: 64,
        nvmlDeviceGetCurrentClocksEventReasons=refuse,
        nvmlDeviceGetCurrentClocksThrottleReasons=lambda h: 0x4)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    source = gpu_monitor.NvmlSource("GPU-1234", 0.0)
    s = source.read()
    assert (s.sm_mhz, s.mem_mhz, s.power_w, s.temp_c, s.reasons) == (1980, 2619, None, 64, 0x4)
    fake.nvmlDeviceGetPowerUsage = lambda h: 612_400
    samples = iter(source)
    assert next(samples).power_w == 612.4
    source.close()
    assert list(samples) == [] and calls == ["init", b"GPU-1234", "shutdown"]
