"""bench profile's bookkeeping (the profile itself needs a GPU): per step kind means of the
allocator's driver calls; the environment beside every figure."""
import torch

from lowbit.bench.profile import ALLOC_COUNTS, StepTimer


def test_allocator_counts_are_means_per_step_kind():
    timer = StepTimer(torch.device("cpu"))
    for kind, before, after in (("mixed", 3, 5), ("mixed", 5, 6), ("decode", 6, 6)):
        timer.kind = kind
        timer.steps[kind] += 1
        timer.count_allocs({k: before for k in ALLOC_COUNTS}, {k: after for k in ALLOC_COUNTS})
    rows = {line.split(" | ")[0].strip("| "): line for line in timer.alloc_table().splitlines()[2:]}
    assert rows["mixed"].endswith("| 1.50 | 1.50 | 1.50 |")  # (2 + 1) / 2 steps
    assert rows["decode"].endswith("| 0.00 | 0.00 | 0.00 |")


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
