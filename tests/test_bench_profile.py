"""bench profile's bookkeeping (the profile itself needs a GPU): per step kind means of the
allocator's driver calls; the environment beside every figure."""
import pytest
import torch

from lowbit.bench.profile import ALLOC_COUNTS, StepTimer


def test_allocator_counts_are_means_per_step_kind():
    timer = StepTimer(torch.device("cpu"))
    for kind, before, after in (("mixed", 3, 5), ("mixed", 5, 6), ("decode", 6, 6)):
        timer.count_allocs({k: before for k in ALLOC_COUNTS}, {k: after for k in ALLOC_COUNTS})
        timer.kind = kind
        timer.end_step()
    rows = {line.split(" | ")[0].strip("| "): line for line in timer.alloc_table().splitlines()[2:]}
    assert rows["mixed"].endswith("| 1.50 | 1.50 | 1.50 |")  # (2 + 1) / 2 steps
    assert rows["decode"].endswith("| 0.00 | 0.00 | 0.00 |")


def test_phases_are_filed_under_the_kind_named_during_the_step(monkeypatch):
    """Scheduling runs before the forward names the step's kind; steps while disabled (traced,
    host-profiled) leave no row, not one of 0 steps (which divided by zero after a 2048-prompt run)."""
    import lowbit.bench.profile as profile

    clock = iter(range(100))
    monkeypatch.setattr(profile.time, "perf_counter", lambda: next(clock) / 1e3)  # every phase: 1 ms
    timer = StepTimer(torch.device("cpu"))
    for kind, enabled in (("mixed", True), ("decode", True), ("decode", True), ("decode b64", False)):
        timer.enabled = enabled
        with timer.phase("schedule"):
            pass
        timer.kind = kind
        with timer.phase("forward"):
            pass
        timer.end_step()
    assert dict(timer.steps) == {"mixed": 1, "decode": 2}
    assert dict(timer.ms["decode"]) == pytest.approx({"schedule": 2.0, "forward": 2.0})
    rows = timer.table().splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["decode", "mixed"]
    assert rows[0].startswith("| decode | 2 | 1.00 | 0.00 | 1.00 |")


def test_environment_records_the_allocator_settings(monkeypatch):
    from lowbit.bench.env import environment

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert "alloc_conf" not in environment("cpu")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert environment("cpu")["alloc_conf"] == "expandable_segments:True"


def test_the_timed_phases_are_model_runner_functions():
    """The profile wraps these by name (it runs on CUDA only: a renamed function would fail there first)."""
    from lowbit.bench.profile import RUNNER_PHASES
    from lowbit.engine import model_runner
    assert all(callable(getattr(model_runner, name, None)) for name in RUNNER_PHASES)
