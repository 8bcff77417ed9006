"""The engine's kept work arrays: reused only when nothing references them."""

from __future__ import annotations

import threading

import pytest
import torch

from deepcrf.ops import workspace

MB = 1 << 20


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("DEEPCRF_WORKSPACE_MB", raising=False)
    workspace.release()
    yield
    workspace.release()


def test_a_freed_array_is_handed_out_again():
    a = workspace.empty((512, 1024), torch.float32)  # 2 MB
    ptr = a.data_ptr()
    assert workspace.kept_bytes() == 2 * MB
    del a
    b = workspace.empty((256, 1024), torch.float32)  # smaller: served by the same array
    assert b.data_ptr() == ptr
    assert workspace.kept_bytes() == 2 * MB


def test_an_array_in_use_or_viewed_is_never_handed_out():
    a = workspace.empty((512, 1024), torch.float32)
    b = workspace.empty((512, 1024), torch.float32)
    assert a.data_ptr() != b.data_ptr()
    row = a[3]  # a view keeps the array in use after `a` is gone
    ptr = a.data_ptr()
    del a
    c = workspace.empty((512, 1024), torch.float32)
    assert c.data_ptr() not in (ptr, b.data_ptr())
    c.fill_(1.0)
    row.fill_(7.0)
    assert bool((c == 1.0).all())
    del row
    d = workspace.empty((512, 1024), torch.float32)
    assert d.data_ptr() == ptr


def test_dtype_small_arrays_and_cuda_are_not_kept():
    a = workspace.empty((512, 1024), torch.float32)
    del a
    b = workspace.empty((512, 1024), torch.int32)  # another dtype: its own array
    assert b.dtype == torch.int32 and workspace.kept_bytes() == 4 * MB
    small = workspace.empty((10, 10), torch.float32)
    assert small.shape == (10, 10) and workspace.kept_bytes() == 4 * MB


def test_limit_evicts_free_arrays_and_zero_turns_it_off(monkeypatch):
    monkeypatch.setenv("DEEPCRF_WORKSPACE_MB", "3")
    a = workspace.empty((512, 1024), torch.float32)
    del a
    b = workspace.empty((512, 1024), torch.int32)  # 2 + 2 MB > 3: the free float array goes
    assert workspace.kept_bytes() == 2 * MB
    c = workspace.empty((512, 1024), torch.float32)  # b in use: c is plain memory
    assert workspace.kept_bytes() == 2 * MB
    assert c.shape == b.shape
    monkeypatch.setenv("DEEPCRF_WORKSPACE_MB", "0")
    workspace.release()
    workspace.empty((512, 1024), torch.float32)
    assert workspace.kept_bytes() == 0
    monkeypatch.setenv("DEEPCRF_WORKSPACE_MB", "lots")
    with pytest.raises(ValueError, match="DEEPCRF_WORKSPACE_MB"):
        workspace.empty((512, 1024), torch.float32)


def test_threads_never_share_an_array():
    got: list[torch.Tensor] = []
    lock = threading.Lock()

    def take():
        for _ in range(20):
            x = workspace.empty((256, 1024), torch.float32)
            with lock:
                got.append(x)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({x.data_ptr() for x in got}) == len(got) == 80


def test_detached_aliases_and_autograd_outputs_keep_the_array():
    a = workspace.empty((512, 1024), torch.float32)
    alias = a.detach()  # a new tensor on the same memory, not a view of `a`
    ptr = a.data_ptr()
    del a
    assert workspace.empty((512, 1024), torch.float32).data_ptr() != ptr
    del alias

    class Out(torch.autograd.Function):  # what a custom Function returns is re-wrapped
        @staticmethod
        def forward(ctx, x):
            out = workspace.empty(x.shape, x.dtype)
            ctx.save_for_backward(out)
            return out.copy_(x)

        @staticmethod
        def backward(ctx, g):
            return g

    x = torch.zeros(512, 1024, requires_grad=True)
    y = Out.apply(x)
    z = workspace.empty((512, 1024), torch.float32)
    assert z.data_ptr() != y.data_ptr()
    z.fill_(3.0)
    assert bool((y == 0).all())


def test_inference_mode_views_are_safe():
    with torch.inference_mode():
        a = workspace.empty((512, 1024), torch.float32)
        view = a[1]
        ptr = a.data_ptr()
        del a
        b = workspace.empty((512, 1024), torch.float32)
    assert view.shape == (1024,)
    assert b.data_ptr() != ptr  # the view (tracked or not) keeps the array from reuse
