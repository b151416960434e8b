"""The virtual-rank message protocol: its spec, run case by case on both implementations.

Two implementations hold this protocol: the compiled mailbox (csrc/comm/local_mailbox.cpp) and
the Python one (esp_kernels/comm/local.py, `_LocalWorld.post`, for builds without the core).
Every case below runs on both and must give the same observable result (`both`), on the CPU and,
in the GPU tier, on CUDA. The spec:

1. Posting. `exchange(sends, recvs)` / `prepare_exchange(...).start()` posts every message of the
   exchange at once and returns one Work; posting never blocks. Peers are ranks of the group;
   the world matches by world rank.
2. Matching. Messages match in posting order per (source, destination) pair, as in NCCL,
   whichever side posts first; a rank may send to itself, in one exchange or across posts.
   `Work.matched()` is true once both sides of each of its messages have posted.
3. Data. After `wait()` (the current stream then waits for the copies on CUDA; on the CPU the
   data is already there) or `synchronize()` (the host waits), the receive buffer holds the
   sent tensor's elements. Zero-size messages match like any other. On the CPU a rank may send
   one part of a buffer into another part of it.
4. Stream order (CUDA). A copy starts after both posters' streams as they were when each posted
   (the data is written, the buffer is free), and the sent tensor and receive buffer stay
   referenced until the copy has run (the caching allocator does not reuse them early).
5. Consume-at-once (CUDA; on the CPU the flag changes nothing). A message both of whose sides
   were posted with `consume_at_once=True` is copied by the last poster of the round (the post
   after which no consume-at-once half waits for its peer), or by the first wait that needs it
   (on the stream it waits for), or by a synchronize: the data rules 3 and 4 still hold. A
   message with only one side posted that way is copied when it matches.
6. Errors. A size or dtype mismatch raises ValueError naming the message
   ("message 0->1: sent 3 x torch.float32 but the receive buffer holds 4 x torch.float32") at
   the wait of both sides. A wait whose message is not matched within the group's timeout raises
   CommTimeout ("virtual rank message 0->1 was not matched by its peer within 0.2 s") and aborts
   the world, naming its rank (rule 7; as NCCL's communicator is aborted on a timeout: the half
   message left pending would take the pair's next message); with an infinite timeout it blocks
   until the peer posts. `start(replace)` swaps prepared sends for
   tensors of the same numel and dtype for one post, and refuses others with ValueError. A message
   copies memory: a lazily conjugated or negated view is refused at its post (ValueError), and a
   receive buffer that requires grad is written all the same.
7. Abort. `abort()` on any rank's handle (run_local / run_steps call it when a rank raises) cuts
   off every message still waiting for its peer: each wait on one raises CommAborted at once,
   naming the failed rank and caused by its exception; every later post raises CommAborted;
   messages matched before the abort still deliver their data.
8. Drivers. `run_local` (a thread per rank) and `run_steps` (step generators, one thread) give
   the same results; when a rank raises, the caller gets that exception with a note naming its
   rank and `peer_errors` (the other ranks' CommAborted); in `run_steps` the CommAborted is
   thrown into the waiting generators at their yield. Ranks of `run_steps` that wait on messages
   no rank posts raise CommError naming them.
"""

import math
import threading
import time

import pytest
import torch

from esp_kernels import _core
from esp_kernels.comm import CommAborted, drive, local_group, run_local, run_steps
from esp_kernels.comm import local as local_mod

PATHS = ("python", "core")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_world(path, n, device="cpu", timeout=30.0):
    """n virtual ranks on the named implementation."""
    saved = local_mod._Mailbox
    if path == "python":
        local_mod._Mailbox = None
    try:
        groups = local_group(n, device, timeout=timeout)
    finally:
        local_mod._Mailbox = saved
    assert (groups[0]._world.box is None) == (path == "python")
    return groups


def both(case, device, *args):
    """Run `case(world_factory, device, *args)` on both implementations; they must agree."""
    seen = {}
    for path in PATHS:
        if path == "core" and local_mod._Mailbox is None:
            pytest.skip(f"compiled mailbox unavailable ({_core._C_ERROR}); the Python path passed")
        seen[path] = case(lambda n, **kw: make_world(path, n, device, **kw), device, *args)
    assert seen["python"] == seen["core"], seen
    return seen["python"]


def _error(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the observable outcome is the error itself
        return type(exc).__name__, str(exc)
    return None


# ---- cases: each returns plain data (compared across the implementations) and checks the spec --

def case_fifo_per_pair(world, device):
    """Three messages 0 -> 1 posted before / after / interleaved with their receives match in
    posting order; a self message across posts too."""
    g = world(2)
    a, b = g
    bufs = [torch.full((2,), -1.0, device=device) for _ in range(3)]
    w_recv0 = b.recv(bufs[0], 0)
    assert not w_recv0.matched()
    works = [a.send(torch.full((2,), float(k), device=device), 1) for k in range(3)]
    assert w_recv0.matched() and works[0].matched() and not works[1].matched()
    w_recv = [w_recv0, b.recv(bufs[1], 0), b.recv(bufs[2], 0)]
    for w in works + w_recv:
        w.synchronize()
    self_buf = torch.empty(3, device=device)
    s = a.send(torch.arange(3.0, device=device), 0)
    r = a.recv(self_buf, 0)
    s.synchronize()
    r.synchronize()
    out = [x.tolist() for x in bufs] + [self_buf.tolist()]
    assert out == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [0.0, 1.0, 2.0]]
    return out


def case_ring_rounds(world, device, n):
    """Rings over orders unlike world order, per-rank sizes (one rank sends nothing), a
    subgroup of a subgroup, all_gather_ints and barrier, on a thread per rank."""
    def body(world_group):
        out = []
        for order in ([*range(n)][::-1], [*range(1, n), 0]):
            ring = world_group.subgroup(order)
            P, r = ring.size, ring.rank
            size = lambda rank: 0 if rank == 1 else 3 * rank + 2  # noqa: E731
            mine = torch.arange(size(r), dtype=torch.float32, device=device) + 100 * ring.world_rank
            buf = torch.full((size((r - 1) % P),), -1.0, device=device)
            ring.exchange(sends=[(mine, (r + 1) % P)], recvs=[(buf, (r - 1) % P)]).wait()
            out.append(buf.tolist())
        if n >= 3 and world_group.rank in (n - 1, 0, 1):
            sub = world_group.subgroup([n - 1, 0, 1])
            if sub.rank in (2, 0):
                pair = sub.subgroup([2, 0])
                assert pair.world_ranks == (1, n - 1) and pair.world_rank == world_group.rank
                y = torch.empty(4, device=device)
                other = 1 - pair.rank
                pair.exchange(sends=[(torch.full((4,), float(world_group.rank), device=device),
                                      other)], recvs=[(y, other)]).wait()
                out.append(y.tolist())
        out.append(world_group.all_gather_ints([world_group.rank, 7]))
        world_group.barrier()
        return out

    res = run_local(world(n), body)
    for r in range(n):
        prev = [(r + 1) % n, (r - 1) % n]  # world rank of the previous ring member per order
        for k, order in enumerate(([*range(n)][::-1], [*range(1, n), 0])):
            pos = order.index(r)
            src = order[(pos - 1) % n]
            size = 0 if (pos - 1) % n == 1 else 3 * ((pos - 1) % n) + 2
            assert res[r][k] == [100.0 * src + i for i in range(size)], (r, k, prev)
        assert res[r][-1] == [[q, 7] for q in range(n)]
    return res


def ring_steps(group, rounds, device):
    """Step generator: `rounds` ring exchanges (message sizes vary by rank and round), each
    round's payload derived from what the previous round received."""
    r, P = group.rank, group.size
    x = torch.full((r + 1,), float(r), device=device)
    for k in range(rounds):
        buf = torch.empty((r - 1 - k) % P + 1, device=device)
        mine = torch.full(((r - k) % P + 1,), 1.0, device=device) * (x[0] + 1)
        yield group.prepare_exchange(sends=[(mine, (r + 1) % P)],
                                     recvs=[(buf, (r - 1) % P)]).start()
        x = buf * 1  # consumed on this rank's stream after the wait
    return x.tolist()


def case_run_steps_and_drive(world, device, n):
    """The same step generators under run_steps (one thread) and drive (a thread per rank)."""
    g = world(n)
    vals = [float(r) for r in range(n)]
    for _ in range(3):
        vals = [vals[(r - 1) % n] + 1 for r in range(n)]
    expected = [[vals[r]] * ((r - 3) % n + 1) for r in range(n)]
    res = [run_steps(g, [ring_steps(x, 3, device) for x in g]),
           run_local(g, lambda x: drive(ring_steps(x, 3, device)))]
    assert res == [expected, expected]
    return res


def case_cpu_overlapping_parts(world, device):
    """A rank sends one part of a buffer into another part of the same buffer."""
    (g,) = world(1)
    x = torch.arange(8.0, device=device)
    g.exchange(sends=[(x[:4], 0)], recvs=[(x[4:], 0)]).synchronize()
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0]
    return x.tolist()


def case_zero_size_and_dtypes(world, device):
    """Zero-size messages, and int64 / float16 / bool payloads."""
    a, b = world(2)
    payloads = [torch.empty(0, device=device), torch.arange(5, device=device),
                torch.tensor([1.5, -2.0], dtype=torch.float16, device=device),
                torch.tensor([True, False, True], device=device)]
    bufs = [torch.empty_like(p) for p in payloads]
    ws = a.exchange(sends=[(p, 1) for p in payloads])
    wr = b.exchange(recvs=[(x, 0) for x in bufs])
    ws.synchronize()
    wr.synchronize()
    out = [x.tolist() for x in bufs]
    assert out == [p.tolist() for p in payloads]
    return out


def case_errors(world, device):
    """Size and dtype mismatches at both sides' waits, a timeout, and replace's checks."""
    out = []
    for sent, held in ((torch.zeros(3), torch.zeros(4)),
                       (torch.zeros(3), torch.zeros(3, dtype=torch.float64))):
        a, b = world(2)
        ws = a.send(sent.to(device), 1)
        wr = b.recv(held.to(device), 0)
        out.append((_error(ws.wait), _error(wr.synchronize)))
    assert out[0][0] == ("ValueError", "message 0->1: sent 3 x torch.float32 but the receive "
                                       "buffer holds 4 x torch.float32") == out[0][1]
    assert out[1][0][0] == "ValueError" and "3 x torch.float64" in out[1][0][1]
    a, b = world(2, timeout=0.2)
    t0 = time.monotonic()
    out.append(_error(a.send(torch.zeros(1, device=device), 1).wait))
    assert time.monotonic() - t0 < 2.0
    assert out[-1] == ("CommTimeout", "virtual rank message 0->1 was not matched by its peer "
                                      "within 0.2 s")
    late = _error(lambda: b.recv(torch.zeros(1, device=device), 0).wait())  # its peer, later
    assert late[0] == "CommAborted" and "because rank 0 failed: CommTimeout" in late[1]
    out.append(late[0])
    ex = a.prepare_exchange(sends=[(torch.zeros(4, device=device), 1)])
    for bad in (torch.zeros(5, device=device), torch.zeros(4, dtype=torch.float64, device=device),
                torch.zeros(8, device=device)[::2]):
        out.append(_error(lambda: ex.start({0: bad}))[0])
    assert out[-3:] == ["ValueError"] * 3
    # One tensor standing in for two sends is checked against each (the compiled mailbox read
    # past a 3-element tensor into a 5-element send); indices are the exchange's sends
    two = a.prepare_exchange(sends=[(torch.zeros(3, device=device), 1),
                                    (torch.zeros(5, device=device), 1)])
    short = torch.arange(100.0, device=device)[:3]
    out.append(_error(lambda: two.start({0: short, 1: short})))
    assert out[-1] == ("ValueError", "replace[1]: 3 x torch.float32 does not stand in for the "
                                     "prepared 5 x torch.float32")
    out.append(_error(lambda: two.start({-1: short}))[0])
    assert out[-1] == "ValueError"
    return out


def case_buffers_are_memory(world, device):
    """A message copies memory: a receive buffer that requires grad is written (the Python
    protocol raised inside its post, its peer then waiting out the timeout, where the mailbox
    wrote it), and a lazily conjugated view, whose memory does not hold its values, is refused at
    the post on both (the mailbox sent it unconjugated, the Python protocol conjugated)."""
    a, b = world(2, timeout=5.0)
    leaf = torch.zeros(3, device=device, requires_grad=True)
    ws = a.send(torch.ones(3, device=device), 1)
    wr = b.recv(leaf, 0)
    ws.wait()
    wr.synchronize()
    got = leaf.detach().tolist()
    assert got == [1.0, 1.0, 1.0]
    lazy = torch.tensor([1 + 2j, 3 - 1j], device=device).conj()
    err = _error(lambda: a.send(lazy, 1))
    assert err[0] == "ValueError" and "lazily conjugated" in err[1]
    return got, err[0]


def case_late_peer_without_deadline(world, device):
    """With an infinite timeout a wait blocks until the peer posts."""
    def late(group):
        if group.rank == 1:
            time.sleep(0.2)
            y = torch.zeros(3, device=device)
            group.recv(y, 0).synchronize()
            return y.tolist()
        group.send(torch.ones(3, device=device), 1).synchronize()

    res = run_local(world(2, timeout=math.inf), late)
    assert res == [None, [1.0, 1.0, 1.0]]
    return res


def case_replace(world, device):
    """start(replace) posts other tensors in place of prepared sends for one call only."""
    def body(group):
        r = group.rank
        fixed, buf = torch.full((4,), float(r), device=device), torch.empty(4, device=device)
        ex = group.prepare_exchange(sends=[(fixed, 1 - r)], recvs=[(buf, 1 - r)])
        yield ex.start({0: torch.full((4,), 10.0 + r, device=device)})
        first = buf.tolist()
        yield ex.start()
        return first, buf.tolist()

    g = world(2)
    res = run_steps(g, [body(x) for x in g])
    assert res == [([11.0] * 4, [1.0] * 4), ([10.0] * 4, [0.0] * 4)]
    return res


def all_to_all_steps(group, rounds, device, consume_at_once=True, late=False):
    """Step generator: `rounds` all-to-all exchanges (self message included); returns what each
    round received. `late`: payloads and buffers are written ~1 ms late on the rank's stream."""
    r, P = group.rank, group.size
    got = []
    for k in range(rounds):
        fill = _late_full if late else (lambda v, n=64: torch.full((n,), float(v), device=device))
        sends = [(fill(100 * r + 10 * k + p), p) for p in range(P)]
        bufs = [fill(-1) for _ in range(P)]
        yield group.prepare_exchange(sends=sends, recvs=[(b, p) for p, b in enumerate(bufs)],
                                     consume_at_once=consume_at_once).start()
        got.append([sorted(set(b.tolist())) for b in bufs])
    return got


def _expected_all_to_all(P, rounds):
    return [[[[100.0 * p + 10 * k + r] for p in range(P)] for k in range(rounds)]
            for r in range(P)]


def case_consume_at_once_rounds(world, device, n):
    """Consume-at-once all-to-all rounds under run_steps (the last poster copies), threads with
    a wait per round (whichever post or wait comes last), and threads with synchronize; a mixed
    exchange (one side at once) as well."""
    late = device == "cuda"
    g = world(n)
    res = [run_steps(g, [all_to_all_steps(x, 3, device, late=late) for x in g]),
           run_local(g, lambda x: drive(all_to_all_steps(x, 3, device, late=late)))]

    def synchronized(x):
        steps = all_to_all_steps(x, 2, device, late=late)
        try:
            work = next(steps)
            while True:
                work.synchronize()
                work = steps.send(None)
        except StopIteration as stop:
            return stop.value
    res.append(run_local(g, synchronized))
    mixed = run_steps(g, [all_to_all_steps(x, 2, device, consume_at_once=(x.rank % 2 == 0),
                                           late=late) for x in g])
    assert res[0] == res[1] == _expected_all_to_all(n, 3)
    assert res[2] == mixed == _expected_all_to_all(n, 2)
    return res + [mixed]


def case_consume_at_once_round_left_open(world, device, finish):
    """A consume-at-once half still pending (2 -> 0) keeps the round open, so the 0 <-> 1
    messages are copied by a wait (on its stream) or a synchronize; the 2 -> 0 message by the
    post that closes the round."""
    g = world(3)
    cuda = device == "cuda"

    def on(r, fn):
        if not cuda:
            return fn()
        with torch.cuda.stream(g[r].stream):
            return fn()

    fill = _late_full if cuda else (lambda v, n=64: torch.full((n,), float(v)))

    def post(r, sends=(), recvs=()):
        return on(r, lambda: g[r].prepare_exchange(sends=list(sends), recvs=list(recvs),
                                                   consume_at_once=True).start())

    x2, b0_2 = on(2, lambda: fill(20)), on(0, lambda: fill(-1))
    w2 = post(2, sends=[(x2, 0)])
    x0, b0 = on(0, lambda: fill(1)), on(0, lambda: fill(-1))
    x1, b1 = on(1, lambda: fill(2)), on(1, lambda: fill(-1))
    w1 = post(1, sends=[(x1, 0)], recvs=[(b1, 0)])
    w0 = post(0, sends=[(x0, 1)], recvs=[(b0, 1)])
    assert w0.matched() and w1.matched() and not w2.matched()
    if finish == "wait":
        on(0, w0.wait)
        on(1, w1.wait)
    else:
        w0.synchronize()
        w1.synchronize()
    got = [on(0, lambda: sorted(set(b0.tolist()))), on(1, lambda: sorted(set(b1.tolist())))]
    w02 = post(0, recvs=[(b0_2, 2)])
    on(0, w02.wait)
    on(2, w2.wait)
    got.append(on(0, lambda: sorted(set(b0_2.tolist()))))
    if cuda:
        torch.cuda.synchronize()
    assert got == [[2.0], [1.0], [20.0]]
    return got


def case_abort(world, device):
    """abort() cuts off pending waits at once (CommAborted naming the failed rank, caused by
    its exception), refuses later posts, and leaves messages matched before it delivered."""
    g = world(3, timeout=30.0)
    delivered = torch.zeros(2, device=device)
    done = g[0].send(torch.ones(2, device=device), 1)
    got = g[1].recv(delivered, 0)
    pending = torch.zeros(2, device=device)
    outcome = {}

    def waiter():
        t0 = time.monotonic()
        try:
            g[1].recv(pending, 2).wait()
            outcome["error"] = None
        except CommAborted as exc:
            outcome["error"] = (str(exc), exc.failed_rank, type(exc.__cause__).__name__)
        outcome["seconds"] = time.monotonic() - t0

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.1)  # the waiter is blocked on its unmatched receive
    g[2].abort(KeyError("rank 2 fails"))
    th.join(5.0)
    assert not th.is_alive() and outcome["seconds"] < 1.0, outcome
    assert g[0].aborted and g[1].aborted
    got.synchronize()
    done.synchronize()
    later = _error(lambda: g[0].send(torch.zeros(1, device=device), 1))
    g[2].abort(ValueError("a second abort changes nothing"))
    out = [outcome["error"], later, delivered.tolist()]
    assert out == [("virtual rank 1: the virtual-rank world was aborted because rank 2 failed: "
                    "KeyError: 'rank 2 fails'", 2, "KeyError"),
                   ("CommAborted", "virtual rank 0: the virtual-rank world was aborted because "
                                   "rank 2 failed: KeyError: 'rank 2 fails'"),
                   [1.0, 1.0]]
    return out


class RankFailure(Exception):
    pass


def case_run_local_failure(world, device):
    """A rank raising mid-exchange: peers blocked on it raise CommAborted within a second (their
    timeout is 30 s); the caller gets the rank's own exception, its rank and the peers'."""
    def body(group):
        x = torch.full((4,), float(group.rank), device=device)
        y = torch.empty(4, device=device)
        nxt, prv = (group.rank + 1) % group.size, (group.rank - 1) % group.size
        group.exchange(sends=[(x, nxt)], recvs=[(y, prv)]).wait()  # round 1: everyone
        if group.rank == 2:
            time.sleep(0.05)  # the peers are blocked on rank 2 by now
            raise RankFailure("injected on rank 2")
        group.recv(y, 2).wait()  # round 2: every other rank waits for rank 2
        return y.tolist()

    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_local(world(4, timeout=30.0), body)
    assert time.monotonic() - t0 < 1.0
    exc = info.value
    peers = {r: (type(e).__name__, e.failed_rank, e.__cause__ is exc)
             for r, e in exc.peer_errors.items()}
    assert exc.__notes__[0].startswith("raised on virtual rank 2; the other ranks raised: rank 0: "
                                       "CommAborted")
    assert peers == {r: ("CommAborted", 2, True) for r in (0, 1, 3)}, peers
    return peers


def case_run_steps_failure(world, device):
    """run_steps: the failing generator's exception reaches the caller; the CommAborted of the
    peers' pending waits is thrown into their generators at the yield (which may clean up)."""
    thrown, cleaned = [], []

    def body(group):
        r = group.rank
        y = torch.empty(2, device=device)
        try:
            if r == 0:  # one pass more, so that ranks 1 and 2 wait on rank 0 when it fails
                yield group.exchange(sends=[(torch.zeros(2, device=device), 0)], recvs=[(y, 0)])
                raise RankFailure("injected on rank 0")
            try:
                yield group.recv(y, 0)
            except CommAborted:
                thrown.append(r)
                raise
        finally:
            cleaned.append(r)

    g = world(3, timeout=30.0)
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_steps(g, [body(x) for x in g])
    assert time.monotonic() - t0 < 1.0
    exc = info.value
    peers = {r: (type(e).__name__, e.failed_rank) for r, e in exc.peer_errors.items()}
    assert peers == {1: ("CommAborted", 0), 2: ("CommAborted", 0)}
    assert sorted(thrown) == [1, 2] and sorted(cleaned) == [0, 1, 2]

    h = world(3)

    def one_sided(group):
        if group.rank == 0:
            yield group.send(torch.zeros(2, device=device), 1)
        return group.rank

    deadlock = _error(lambda: run_steps(h, [one_sided(x) for x in h]))
    assert deadlock[0] == "CommError" and "virtual ranks [0] wait" in deadlock[1]
    return peers, deadlock[0]


# ---- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [case_fifo_per_pair, case_zero_size_and_dtypes, case_errors,
                                  case_buffers_are_memory,
                                  case_late_peer_without_deadline, case_replace, case_abort,
                                  case_run_local_failure, case_run_steps_failure],
                         ids=lambda c: c.__name__[5:])
def test_protocol(case, device):
    both(case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ring_rounds(n, device):
    both(case_ring_rounds, device, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_run_steps_and_drive(n, device):
    both(case_run_steps_and_drive, device, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_consume_at_once_rounds(n, device):
    both(case_consume_at_once_rounds, device, n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("finish", ["wait", "synchronize"])
def test_consume_at_once_round_left_open(finish, device):
    both(case_consume_at_once_round_left_open, device, finish)


def test_cpu_overlapping_parts():
    both(case_cpu_overlapping_parts, "cpu")


# ---- CUDA stream order (rule 4): observable only on a GPU, on both implementations ------------

def _late_full(value, n=1000):
    """A tensor of `value` written ~1 ms late on the current stream (a copy that does not wait
    for this stream reads, or is overwritten by, what was there before)."""
    torch.cuda._sleep(2_000_000)
    return torch.full((n,), float(value), device="cuda")


def case_gpu_stream_ordering(world, device, n):
    """Receives consumed on each rank's compute stream after wait(), no device sync, after a long
    producer on the sender's stream (threads), and rounds whose payload depends on the last
    round's receive (run_steps, consume-at-once or not)."""
    def body(group):
        r, P = group.rank, group.size
        a = torch.randn(2048, 2048, device="cuda")
        x = (a @ a).sum(1)  # long producer on the compute stream
        y = torch.empty_like(x)
        group.exchange(sends=[(x, (r + 1) % P)], recvs=[(y, (r - 1) % P)]).wait()
        return x.cpu(), (y * 1).cpu()

    g = world(n)
    res = run_local(g, body)
    ok = [torch.equal(res[r][1], res[(r - 1) % n][0]) for r in range(n)]

    def chain(group, consume_at_once):
        r, P = group.rank, group.size
        x = torch.full((r + 1,), float(r), device="cuda")
        for k in range(5):
            buf = torch.empty((r - 1 - k) % P + 1, device="cuda")
            mine = torch.full(((r - k) % P + 1,), 1.0, device="cuda") * (x[0] + 1)
            yield group.prepare_exchange(sends=[(mine, (r + 1) % P)], recvs=[(buf, (r - 1) % P)],
                                         consume_at_once=consume_at_once).start()
            x = buf * 1
        return float(x[0])

    vals = [float(r) for r in range(n)]
    for _ in range(5):
        vals = [vals[(r - 1) % n] + 1 for r in range(n)]
    for flag in (False, True):
        ok.append(run_steps(g, [chain(x, flag) for x in g]) == vals)
    assert all(ok), ok
    return ok


def case_gpu_self_message_across_posts(world, device):
    """A rank sends to itself from one stream and receives in a later post from another: the
    copy must wait for the stream the send was posted on (its long producer)."""
    (g,) = world(1)
    other = torch.cuda.Stream()

    def body(group):
        a = torch.randn(2048, 2048, device="cuda")
        x = (a @ a @ a).sum(1)
        sent = group.send(x, 0)
        y = torch.empty_like(x)
        other.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(other):
            got = group.recv(y, 0)
            got.wait()
            z = y * 1
        yield sent
        torch.cuda.current_stream().wait_stream(other)
        return bool(torch.equal(z, x))

    res = run_steps([g], [body(g)])
    assert res == [True]
    return res


def case_gpu_sent_tensor_outlives_caller(world, device):
    """A sender drops its tensor right after posting and fills a new one of the same size before
    the receiver posts: the world must keep the dropped block until its copy has run."""
    groups = world(2)

    def body(group):
        n = 1 << 20
        if group.rank == 0:
            tmp = torch.arange(n, device="cuda", dtype=torch.float32)
            work = group.send(tmp, 1)
            del tmp
            junk = torch.full((n,), -1.0, device="cuda")
            yield work
            return junk.sum().item()
        buf = torch.empty(n, device="cuda")
        yield group.recv(buf, 0)
        return bool(torch.equal(buf, torch.arange(n, device="cuda", dtype=torch.float32)))

    res = run_steps(groups, [body(g) for g in groups])
    assert res == [-(1 << 20), True]
    return res


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2, 4])
def test_gpu_stream_ordering(n):
    both(case_gpu_stream_ordering, "cuda", n)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [case_gpu_self_message_across_posts,
                                  case_gpu_sent_tensor_outlives_caller],
                         ids=lambda c: c.__name__[9:])
def test_gpu_buffers(case):
    both(case, "cuda")
