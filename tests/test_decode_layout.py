"""The decode index maps (esp_kernels/decode/layout.py) on random plans, with plain integers: the
exchanges each instance's layout describes are simulated symbolically (every row labelled with
the request, or the (holder, request) state, it carries) and checked against the plan."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

import esp_kernels as esp
from esp_kernels.decode.layout import decode_layout


@st.composite
def plans(draw):
    n = draw(st.integers(1, 5))
    insts = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n, unique=True))
    B = draw(st.integers(0, 9))
    masters, shards, append_to = [], [], []
    appending = draw(st.booleans())
    for _ in range(B):
        masters.append(draw(st.sampled_from(insts)))
        # shards before the step; the appended token may go where the request has none yet
        shards.append({i: draw(st.integers(1, 50)) for i in insts if draw(st.booleans())})
        if appending:
            append_to.append(draw(st.sampled_from(insts)))
    plan = esp.DecodePlan([f"r{b}" for b in range(B)], masters, shards,
                          append_to=append_to if appending else None)
    return plan, insts


@settings(max_examples=300, deadline=None)
@given(plans())
def test_layouts_agree_with_the_plan_and_each_other(case):
    plan, insts = case
    lay = {me: decode_layout(plan, me) for me in insts}
    B = len(plan.requests)
    for me, L in lay.items():
        # Rows: my q rows are my requests in batch order; I hold exactly the requests with KV
        # here, once each, grouped by master, each group in that master's row order.
        assert list(L.mine) == plan.mastered_by(me)
        assert Counter(L.held) == Counter(i for i in range(B) if plan.kv_len(i, me))
        seen = 0
        for m, (a, b) in L.held_segments.items():
            assert a == seen and b > a
            seen = b
            group = list(L.held[a:b])
            assert all(plan.masters[i] == m for i in group)
            assert group == [i for i in plan.mastered_by(m) if plan.kv_len(i, me)]
        assert seen == L.n_held
        assert sorted(L.held_segments) == list(L.held_segments)
        # My own held requests are filled from q's rows directly.
        for r, dst in zip(L.q_own_rows, L.q_own_dst):
            assert L.held[dst] == L.mine[r] and plan.masters[L.held[dst]] == me
        assert L.q_identity == (list(L.held) == list(L.mine))
        for h, (a, b) in L.recv_segments.items():
            rows = L.q_send_rows[a:b]
            assert [L.mine[r] for r in rows] == list(L.serve[h])
            if L.q_send_whole:
                assert list(rows) == list(range(len(L.mine)))

    # Messages: the q a master sends a holder is exactly what the holder expects, in order.
    for m, Lm in lay.items():
        for h, (a, b) in Lm.recv_segments.items():
            sent = [Lm.mine[r] for r in Lm.q_send_rows[a:b]]
            ha, hb = lay[h].held_segments[m]
            assert sent == list(lay[h].held[ha:hb]), (m, h)
        # and every holder that holds a request of m is one m sends to
        for h, Lh in lay.items():
            if h != m and m in Lh.held_segments:
                assert h in Lm.recv_segments

    # States back: label every pool row with the (holder, request) state it carries, then the
    # merge map must name each request's holders' states exactly once, and empties otherwise.
    for m, Lm in lay.items():
        pool = {}
        if m in Lm.held_segments:
            a, b = Lm.held_segments[m]
            for r in range(a, b):
                pool[r] = (m, Lm.held[r])
        for h, (a, b) in Lm.recv_segments.items():
            ha, hb = lay[h].held_segments[m]
            assert hb - ha == b - a
            for k in range(b - a):
                pool[Lm.n_held + a + k] = (h, lay[h].held[ha + k])
        pool[Lm.empty_row] = None
        assert len(Lm.merge_rows) == max(Lm.num_states, 1)
        for b_, i in enumerate(Lm.mine):
            got = [pool[Lm.merge_rows[s][b_]] for s in range(len(Lm.merge_rows))]
            states = [x for x in got if x is not None]
            holders = [h for h in lay if plan.kv_len(i, h)]
            assert Counter(states) == Counter((h, i) for h in holders)
            assert got.count(None) == len(Lm.merge_rows) - len(holders)

    # Appends: each appended token is stored once, by the instance the plan names; a master's
    # sent block for a target is exactly what the target expects from it, in order.
    stored = Counter()
    for me, L in lay.items():
        assert L.appending == any(t is not None for t in plan.append_to)
        for r, i in zip(L.append_own_rows, L.append_own):
            assert L.mine[r] == i and plan.append_to[i] == me
        stored.update((me, i) for i in L.append_own + L.append_recv)
        for t, (a, b) in L.append_send_segments.items():
            sent = [L.mine[r] for r in L.append_send_rows[a:b]]
            ta, tb = lay[t].append_recv_segments[me]
            assert sent == list(lay[t].append_recv[ta:tb])
    assert stored == Counter((t, i) for i, t in enumerate(plan.append_to) if t is not None)


def test_layout_of_an_instance_outside_the_plan_is_empty():
    plan = esp.DecodePlan(["a", "b"], [0, 1], [{0: 3, 1: 2}, {1: 4}])
    L = decode_layout(plan, 7)
    assert L.mine == () and L.held == () and not L.peers() and L.merge_rows == ((),)
