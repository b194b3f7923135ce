"""derived.py: copies of a weight made once, remade when it changes, freed with it."""

from __future__ import annotations

import gc

import torch

from megatron.early_exit.derived import DerivedCopies


def test_a_copy_is_made_once_and_remade_when_the_weight_changes():
    cache, made = DerivedCopies(), []

    def make(w):
        made.append(1)
        return w.t().contiguous()

    w = torch.randn(4, 3)
    first = cache.get(w, "t", make)
    assert cache.get(w, "t", make) is first and len(made) == 1  # reused
    torch.testing.assert_close(first, w.t())
    with torch.no_grad():
        w.mul_(2)  # in place: the version counter moves
    again = cache.get(w, "t", make)
    assert len(made) == 2 and torch.equal(again, w.t())
    w.data = torch.randn(4, 3)  # new storage, same tensor object
    assert torch.equal(cache.get(w, "t", make), w.t()) and len(made) == 3


def test_kinds_are_separate_and_drop_frees_them():
    cache, w = DerivedCopies(), torch.randn(2, 2)
    a = cache.get(w, "a", lambda x: x + 1)
    b = cache.get(w, ("b", 2), lambda x: x * 2)
    assert sorted(map(str, cache.kinds(w))) == ["('b', 2)", "a"] and len(cache) == 2
    assert torch.equal(a, w + 1) and torch.equal(b, w * 2)
    cache.drop(w, ["a"])
    assert cache.kinds(w) == [("b", 2)]
    cache.drop(w)
    assert cache.kinds(w) == [] and len(cache) == 0


def test_copies_die_with_their_weight():
    cache = DerivedCopies()
    w = torch.randn(8, 8)
    cache.get(w, "t", lambda x: x.t().contiguous())
    assert len(cache) == 1
    del w
    gc.collect()
    assert len(cache) == 0
