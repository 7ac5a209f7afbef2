"""`to_device_int64`: the eager forward batch's inputs go to the device in one copy that does not
wait for the GPU (shared/batch.py). The values and layout are checked on the CPU; that the copy
does not wait for work already queued is checked on a GPU."""

from __future__ import annotations

import pytest
import torch

from shared.batch import to_device_int64


def test_parts_come_back_in_order_with_their_values() -> None:
    slots = torch.tensor([7, 8, 9], dtype=torch.int64)
    parts = [[1, 2, 3], [], slots, [4], [5, 6], torch.empty(0, dtype=torch.int64)]
    out = to_device_int64(parts, torch.device("cpu"))
    assert [t.tolist() for t in out] == [[1, 2, 3], [], [7, 8, 9], [4], [5, 6], []]
    assert all(t.dtype == torch.int64 and t.is_contiguous() for t in out)


def test_each_part_starts_16_bytes_aligned_and_parts_do_not_overlap() -> None:
    out = to_device_int64([[1], [2, 3, 4], torch.arange(5), [6, 7]], torch.device("cpu"))
    base = out[0].data_ptr()
    assert all((t.data_ptr() - base) % 16 == 0 for t in out)
    out[0].fill_(-1)  # an in-place write to one view (the runner patches input_ids) stays in it
    assert [t.tolist() for t in out[1:]] == [[2, 3, 4], [0, 1, 2, 3, 4], [6, 7]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_upload_does_not_wait_for_queued_gpu_work() -> None:
    device = torch.device("cuda")
    done = torch.cuda.Event()
    torch.cuda._sleep(200_000_000)  # ~0.1 s or more of GPU time queued on the current stream
    done.record()
    out = to_device_int64([list(range(1000)), torch.arange(10)], device)
    assert not done.query(), "the upload waited for the GPU work queued before it"
    torch.cuda.synchronize()
    assert out[0].tolist() == list(range(1000)) and out[1].tolist() == list(range(10))
