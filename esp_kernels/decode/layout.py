"""Index maps of one instance for one DecodePlan: plain integers, no torch, no devices.

Everything the decode exchange needs to know about *where rows go* is a pure function of
(plan, instance), computed here once per plan; `DecodeRunner` turns it into device index tensors
and message buffers. Vocabulary (request indices are positions in `plan.requests`):

- my q rows: the requests this instance masters, in batch order (`plan.mastered_by(me)`);
- held rows: the requests this instance holds KV of, grouped by master (ascending world rank),
  each group in that master's row order. Row r of the held block is both the query the partial
  kernel reads and the state (o, lse) it writes; the group of master m travels to m as one
  message each way;
- received rows: the states my remote holders send back, one segment per holder (ascending),
  each in my row order restricted to what that holder holds. A master's q message to holder h
  has exactly h's received segment's rows, in the same order;
- the state pool of a master = [held rows ; received rows ; one empty state (0, -inf)], and
  `merge_rows[s][b]` is the pool row of the s-th holder's state of my b-th request (the empty
  row where that request has fewer than `num_states` holders).

The invariants (tested with hypothesis on random plans): a master merges, for each request, the
states of exactly the request's holders, once each; a holder serves exactly the requests it
holds, in the order its master expects; sender and receiver agree on every message's rows; every
appended token is stored by exactly the instance the plan names.
"""

from __future__ import annotations

import dataclasses


def segments(sizes) -> tuple[list[tuple[int, int]], int]:
    """[(start, end)] of consecutive blocks of the given sizes, and the total."""
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out, start


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """Rows, segments and message layout of `instance` for one plan (see module docstring).

    Segments map a peer's world rank to a [start, end) range of rows; dicts are in ascending
    peer order, which is also the order of the messages in each exchange.
    """

    instance: int
    mine: tuple[int, ...]                       # request index of each of my q rows
    held: tuple[int, ...]                       # request index of each held row
    held_segments: dict[int, tuple[int, int]]   # master -> rows of `held` it masters
    serve: dict[int, tuple[int, ...]]           # holder (me included) -> my requests it holds
    recv_segments: dict[int, tuple[int, int]]   # remote holder -> rows of the received block
    q_send_rows: tuple[int, ...]                # q row of each q_send row (recv segment order)
    q_own_rows: tuple[int, ...]                 # q rows of the requests I master and hold ...
    q_own_dst: tuple[int, ...]                  # ... and the held rows they fill
    q_identity: bool                            # held rows == my q rows (read q in place)
    q_send_whole: bool                          # every remote holder gets all of q, in order
    append_own_rows: tuple[int, ...]            # q rows whose new token I store ...
    append_own: tuple[int, ...]                 # ... their request indices
    append_send_segments: dict[int, tuple[int, int]]   # target -> rows of the sent block
    append_send_rows: tuple[int, ...]           # q row of each sent token (segment order)
    append_recv_segments: dict[int, tuple[int, int]]   # master -> rows of the received block
    append_recv: tuple[int, ...]                # request index of each received token
    appending: bool                             # the plan appends a token (anywhere)
    num_states: int                             # most holders of any of my requests
    merge_rows: tuple[tuple[int, ...], ...]     # [max(num_states, 1)][len(mine)] pool rows

    @property
    def n_held(self) -> int:
        return len(self.held)

    @property
    def n_recv(self) -> int:
        return sum(b - a for a, b in self.recv_segments.values())

    @property
    def empty_row(self) -> int:
        """Pool row of the empty state (0, -inf)."""
        return self.n_held + self.n_recv

    def peers(self) -> set[int]:
        """World ranks this instance exchanges messages with."""
        return (set(self.recv_segments) | {m for m in self.held_segments if m != self.instance}
                | set(self.append_send_segments) | set(self.append_recv_segments))


def decode_layout(plan, instance: int) -> DecodeLayout:
    """The DecodeLayout of world rank `instance` for `plan` (a DecodePlan: its masters,
    append_to and, per request, the instances holding tokens this step, `kv_shards(i)`)."""
    me = int(instance)
    masters, append_to = plan.masters, plan.append_to
    shards = [plan.kv_shards(i) for i in range(len(masters))]  # appended tokens counted
    rows_of: dict[int, list[int]] = {}   # master -> its requests in batch order (= its q rows)
    for i, m in enumerate(masters):
        rows_of.setdefault(m, []).append(i)
    mine = rows_of.get(me, [])
    row_of = {i: r for r, i in enumerate(mine)}

    # Holder side.
    held_masters = sorted({masters[i] for i, s in enumerate(shards) if me in s})
    held_by_master = {m: [i for i in rows_of[m] if me in shards[i]] for m in held_masters}
    held = [i for m in held_masters for i in held_by_master[m]]
    seg, _ = segments(len(held_by_master[m]) for m in held_masters)
    held_segments = dict(zip(held_masters, seg))

    # Master side.
    holders = sorted({h for i in mine for h in shards[i]})
    serve = {h: tuple(i for i in mine if h in shards[i]) for h in holders}
    remote = [h for h in holders if h != me]
    rseg, _ = segments(len(serve[h]) for h in remote)
    recv_segments = dict(zip(remote, rseg))
    q_send_rows = tuple(row_of[i] for h in remote for i in serve[h])
    own = held_by_master.get(me, [])
    own_start = held_segments.get(me, (0, 0))[0]
    q_own_rows = tuple(row_of[i] for i in own)
    q_own_dst = tuple(range(own_start, own_start + len(own)))
    q_identity = len(held) == len(mine) and q_own_rows == tuple(range(len(mine)))
    q_send_whole = bool(remote) and all(serve[h] == tuple(mine) for h in remote)

    # Appends: my new tokens by target; the tokens others send me, by master.
    app_dst: dict[int, list[int]] = {}
    for i in mine:
        t = append_to[i]
        if t is not None:
            app_dst.setdefault(t, []).append(i)
    append_own = tuple(app_dst.get(me, ()))
    targets = sorted(t for t in app_dst if t != me)
    aseg, _ = segments(len(app_dst[t]) for t in targets)
    incoming_masters = sorted({masters[i] for i, t in enumerate(append_to)
                               if t == me and masters[i] != me})
    incoming = {m: [i for i in rows_of[m] if append_to[i] == me] for m in incoming_masters}
    iseg, _ = segments(len(incoming[m]) for m in incoming_masters)

    # Merge map: pool = [held ; received ; empty].
    n_held, n_recv = len(held), len(q_send_rows)
    pool_row = {(me, i): own_start + k for k, i in enumerate(own)}
    for h, (a, _) in recv_segments.items():
        pool_row.update(((h, i), n_held + a + k) for k, i in enumerate(serve[h]))
    num_states = max((len(shards[i]) for i in mine), default=0)
    merge_rows = [[n_held + n_recv] * len(mine) for _ in range(max(num_states, 1))]
    for b, i in enumerate(mine):
        for s, h in enumerate(shards[i]):  # ascending
            merge_rows[s][b] = pool_row[h, i]

    return DecodeLayout(
        instance=me, mine=tuple(mine), held=tuple(held), held_segments=held_segments,
        serve=serve, recv_segments=recv_segments, q_send_rows=q_send_rows,
        q_own_rows=q_own_rows, q_own_dst=q_own_dst, q_identity=q_identity,
        q_send_whole=q_send_whole,
        append_own_rows=tuple(row_of[i] for i in append_own), append_own=append_own,
        append_send_segments=dict(zip(targets, aseg)),
        append_send_rows=tuple(row_of[i] for t in targets for i in app_dst[t]),
        append_recv_segments=dict(zip(incoming_masters, iseg)),
        append_recv=tuple(i for m in incoming_masters for i in incoming[m]),
        appending=any(t is not None for t in append_to), num_states=num_states,
        merge_rows=tuple(tuple(r) for r in merge_rows))
