"""Host-to-device helpers: values and dtypes as given, pinned staging only for CUDA."""
import numpy as np
import pytest
import torch

from lowbit.layers.transfer import copy_to, pinned, to_device


def test_to_device_keeps_values_and_dtype():
    got = to_device([3, 1, 2], torch.long, "cpu")
    assert got.dtype == torch.long and got.tolist() == [3, 1, 2]
    arr = np.array([[1, -1], [2, 5]], dtype=np.int32)
    got = to_device(arr, torch.int32, torch.device("cpu"))
    assert got.dtype == torch.int32 and got.tolist() == [[1, -1], [2, 5]]
    assert to_device([0.5, 2.0], torch.float32, "cpu").tolist() == [0.5, 2.0]
    dst = torch.zeros(4, dtype=torch.long)
    copy_to(dst[:3], torch.tensor([7, 8, 9]))
    assert dst.tolist() == [7, 8, 9, 0]


def test_only_cuda_copies_are_staged_in_pinned_memory():
    t = torch.arange(5)
    assert pinned(t, "cpu") is t
    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs CUDA")
    p = pinned(t, "cuda")
    assert p.is_pinned() and torch.equal(p, t)
    assert torch.equal(to_device([1, 2], torch.long, "cuda").cpu(), torch.tensor([1, 2]))
