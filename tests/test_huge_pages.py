"""The decode kernels' weight copies on transparent huge pages (`inference/huge_pages.py`): the
copies hold what was written into them beside each other, their bytes come back when they are
freed, the mapping is advised for huge pages, and the products and the int8 head read the same
numbers from them as from ordinary pages."""

from __future__ import annotations

import gc

import pytest
import torch

from megatron.early_exit.inference import greedy_head, huge_pages, native

needs_thp = pytest.mark.skipif(not huge_pages.supported(), reason="no transparent huge pages here")


@pytest.fixture
def on():
    before = huge_pages._ON[0]
    huge_pages.enabled(True)
    yield
    huge_pages._ON[0] = before


@needs_thp
def test_copies_keep_their_bytes_beside_each_other_and_are_advised(on):
    made = [huge_pages.empty((100 + 37 * i, 3), torch.bfloat16 if i % 2 else torch.float32) for i in range(40)]
    for i, t in enumerate(made):
        t.fill_(i)
    big = huge_pages.empty(CHUNK_AND_A_BIT, torch.uint8)  # a mapping of its own
    big.fill_(7)
    assert all(bool((t == i).all()) for i, t in enumerate(made))
    assert all(t.is_contiguous() and t.data_ptr() % huge_pages.ALIGN == 0 for t in made)
    assert big.data_ptr() % huge_pages.HUGE == 0 and int(big[-1]) == 7
    assert huge_pages.advised(made[0]) and huge_pages.advised(made[-1]) and huge_pages.advised(big)
    assert not huge_pages.advised(torch.empty(1 << 16))  # an ordinary allocation is not
    starts = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in made)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(starts, starts[1:]))  # no two overlap


CHUNK_AND_A_BIT = huge_pages.CHUNK // 2 + 4096


@needs_thp
def test_a_freed_copys_bytes_are_reused_only_after_its_last_view_is_gone(on):
    first = huge_pages.empty(1 << 16, torch.uint8)
    view = first.view(torch.int32)[10:20]  # a view outlives the tensor it came from
    address = first.data_ptr()
    del first
    gc.collect()
    second = huge_pages.empty(1 << 16, torch.uint8)
    assert second.data_ptr() != address  # still in use through `view`
    view.fill_(-1)
    second.fill_(1)
    assert bool((view == -1).all())
    del view
    gc.collect()
    third = huge_pages.empty(1 << 16, torch.uint8)
    assert third.data_ptr() == address  # first fit: the freed copy's bytes


@needs_thp
def test_a_chunk_whose_copies_are_all_freed_is_unmapped(on):
    gc.collect()
    huge_pages.empty(1, torch.uint8)  # returns taken in
    chunks = len(huge_pages._ARENA.chunks)
    held = [huge_pages.empty(huge_pages.CHUNK // 4, torch.uint8) for _ in range(8)]  # two chunks' worth at least
    assert len(huge_pages._ARENA.chunks) >= chunks + 1
    del held
    gc.collect()
    huge_pages.empty(1, torch.uint8)
    assert len(huge_pages._ARENA.chunks) <= chunks + 1  # at most the newest, kept for what comes next


@needs_thp
@pytest.mark.skipif(not native.available(torch.bfloat16), reason="no native kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_products_and_int8_head_read_the_same_numbers_from_either_page(dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200, 96, generator=gen).to(dtype)
    x = torch.randn(3, 96, generator=gen).to(dtype)
    before = huge_pages._ON[0]
    try:
        copies = {}
        for on in (True, False):
            huge_pages.enabled(on)
            copies[on] = (native.pack(w), greedy_head.quantize(w))
    finally:
        huge_pages._ON[0] = before
    assert huge_pages.advised(copies[True][0]) and not huge_pages.advised(copies[False][0])
    assert huge_pages.advised(copies[True][1].q)
    assert torch.equal(copies[True][0], copies[False][0]) and torch.equal(copies[True][1].q, copies[False][1].q)
    assert torch.equal(native.linear(x, copies[True][0], 200), native.linear(x, copies[False][0], 200))


def test_the_switch_reads_its_variable_and_names_it_when_wrong(monkeypatch):
    before = huge_pages._ON[0]
    try:
        monkeypatch.setenv(huge_pages.ENV, "0")
        huge_pages._ON[0] = None
        assert huge_pages.enabled() is False
        assert not huge_pages.advised(huge_pages.empty(1 << 20, torch.uint8))
        monkeypatch.setenv(huge_pages.ENV, "yes")
        huge_pages._ON[0] = None
        with pytest.raises(ValueError, match="EE_HUGE_PAGES='yes'"):
            huge_pages.enabled()
    finally:
        huge_pages._ON[0] = before
