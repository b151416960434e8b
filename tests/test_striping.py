"""esp.striping: the public striping helpers an engine uses (positions for RoPE, sampling rows)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import esp_kernels as esp
from esp_kernels import striping

lengths = st.lists(st.integers(1, 40), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(seqlens=lengths, world=st.integers(1, 6))
def test_stripe_roundtrip_and_positions(seqlens, world):
    total = sum(seqlens)
    x = torch.arange(total)
    parts = striping.stripe(x, seqlens, world)
    assert torch.equal(striping.unstripe(parts, seqlens), x)
    starts = torch.tensor([0] + seqlens[:-1]).cumsum(0)
    req_of = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
    for r, part in enumerate(parts):
        assert part.numel() == sum(striping.stripe_lengths(seqlens, world, r))
        pos = striping.stripe_positions(seqlens, world, r)
        # the global position of each stripe token is its packed index minus its request start
        assert torch.equal(pos, part - starts[req_of[part]])
        assert bool((pos % world == r).all())


@settings(max_examples=60, deadline=None)
@given(seqlens=lengths, world=st.integers(1, 6))
def test_last_token_location(seqlens, world):
    parts = striping.stripe(torch.arange(sum(seqlens)), seqlens, world)
    ends = torch.tensor(seqlens).cumsum(0) - 1
    for b, (rank, row) in enumerate(striping.last_token_location(seqlens, world)):
        assert rank == (seqlens[b] - 1) % world
        assert int(parts[rank][row]) == int(ends[b])


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="ring of 2"):
        striping.stripe_lengths([3], 2, 2)
    with pytest.raises(ValueError, match="world"):
        striping.stripe_positions([3], 0, 0)
    with pytest.raises(ValueError, match="seqlens sum"):
        striping.stripe(torch.zeros(5), [3], 2)
    with pytest.raises(ValueError, match="no last token"):
        striping.last_token_location([3, 0], 2)
    with pytest.raises(ValueError, match="part 1"):
        striping.unstripe([torch.zeros(2), torch.zeros(2)], [3])
    # lengths are integers >= 0, never truncated (a [-2, 12] batch of 10 tokens striped into 12
    # with duplicates, a length of 2.5 read as 2)
    with pytest.raises(ValueError, match=r"seqlens\[0\] must be >= 0, got -2"):
        striping.stripe(torch.arange(10), [-2, 12], 2)
    for fn, args in ((striping.stripe_positions, (2, 0)), (striping.stripe_lengths, (2, 0)),
                     (striping.stripe_indices, (2, 0)), (striping.last_token_location, (2,)),
                     (striping.stripe, (2,))):
        for bad, name in (([2.5], "seqlens\\[0\\]"), ([3, True], "seqlens\\[1\\]"),
                          (["4"], "seqlens\\[0\\]")):
            call_args = (torch.zeros(3),) if fn is striping.stripe else ()
            with pytest.raises(TypeError, match=f"{name} must be an integer"):
                fn(*call_args, bad, *args)
    with pytest.raises(TypeError, match=r"seqlens\[1\] must be an integer"):
        striping.unstripe([torch.zeros(2), torch.zeros(1)], [3, 1.0])
    assert striping.stripe_lengths(torch.tensor([5, 3]), 2, 1) == [2, 1]


def test_exported():
    assert esp.striping is striping
