#pragma once

// The message matching of virtual ranks (esp_kernels/comm/local.py) in C++: one call per post
// and one per wait. In Python the matching of one exchange cost ~19 us per rank on the GPU
// machine's host (H100) even for CPU tensors, two exchanges per decode layer
// against a 30 us per-layer budget.
//
// Semantics (those of the pure-Python world, which stays for builds without this core):
// messages match in posting order per (source, destination) pair, as in NCCL. Whichever side
// posts second matches the message: on the CPU it copies at once; on CUDA the messages one post
// matched are moved by one copy kernel after the first posters' ready events (recorded on their
// streams when they posted), and one done event is recorded that the first posters' waits
// enqueue. The kernel runs on the poster's communication stream, so the poster's compute goes on
// meanwhile. The Python objects passed with each post (its tensors) stay referenced until the
// copies that read or write them have completed.
//
// Rounds of consume-at-once exchanges (CUDA; the poster waits on the exchange before it enqueues
// other work, as the decode driver does): a message both of whose sides were posted that way
// is not copied by the post that matches it but deferred, and the post that leaves no such half
// pending anywhere (the last poster of a round) copies every deferred message with one kernel
// on its own stream (whatever their size: every poster waits on them at once anyway); a wait on
// a message still deferred copies them first, so a half whose peer never posts (a round that
// never ends) only moves the copies to the waits. With P ranks in an all-to-all round that is
// one copy and one done event per round instead of one per matching post, and P-1 waits on it:
// 11 driver calls instead of 21 for 4 ranks (see post).
//
// Abort (a virtual rank failed, esp_kernels/comm/local.py): every message still waiting for its
// peer gets the abort's reason and counts as matched, so every blocked wait returns at once and
// raises MailboxAborted; later posts raise it too. Messages already matched keep their copies.

#include <pybind11/pybind11.h>

#include <stdexcept>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "local_copy.h"

namespace esp {

// Raised by posts after abort() and by waits on messages the abort cut off (Python:
// esp_kernels._C.MailboxAborted, turned into esp_kernels.comm.CommAborted).
class MailboxAborted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One side of a message: a contiguous buffer and its peer (world rank).
struct MessageSpec {
  uintptr_t ptr = 0;
  int64_t numel = 0;
  int64_t elem_size = 0;
  std::string dtype;  // compared on matching; named in mismatch errors
  int peer = 0;
};

// The sends and receives of one exchange, converted once (a prepared exchange posts the same
// list on every layer). consume_at_once: the poster waits on this exchange before it enqueues
// other work on its stream, so its copies may run on that stream (see the top).
struct MessageList {
  std::vector<MessageSpec> sends, recvs;
  bool consume_at_once = false;
};

struct LocalMessage {
  int src = 0, dst = 0;
  MessageSpec send, recv;  // recv.peer / send.peer are unused: src and dst say who
  std::shared_ptr<Event> send_ready, recv_ready;  // CUDA: the posters' ready events
  uintptr_t send_stream = 0, recv_stream = 0;      // CUDA: the streams the sides were posted on
  pybind11::object first_keep;  // the first poster's objects, until the message is matched
  pybind11::object second_keep;  // a deferred message: the second poster's, until its copy
  bool first_at_once = false;    // the first side was posted consume_at_once
  bool deferred = false;         // both sides posted, copy not enqueued yet (see the top)
  std::shared_ptr<Event> done;  // CUDA: recorded after the copy
  uintptr_t copy_stream = 0;    // CUDA: the stream the copy was enqueued on
  std::string error;            // set on a size or dtype mismatch, a failed post or an abort
  bool aborted = false;         // `error` is the abort's reason (see the top)
  std::atomic<bool> matched{false};
};

struct MailboxState;

// The messages of one post.
class LocalWork {
 public:
  LocalWork(std::shared_ptr<MailboxState> box, int rank,
            std::vector<std::shared_ptr<LocalMessage>> msgs)
      : box_(std::move(box)), rank_(rank), msgs_(std::move(msgs)) {}

  // Both sides of every message have posted (its copy is enqueued, or deferred to a wait).
  bool matched() const;
  // Blocks (call without the GIL) until matched() or `timeout_s` passed; returns matched().
  bool wait_matched(double timeout_s) const;
  // (src, dst) of the first message not yet matched, (-1, -1) if none.
  std::pair<int, int> first_unmatched() const;
  // Requires matched(). Throws std::invalid_argument for a mismatched message; on CUDA makes
  // `stream` wait for the copies (once per distinct done event), first copying deferred
  // messages on `stream`.
  void wait(uintptr_t stream) const;
  // Requires matched(). Errors as wait(); blocks the host until the copies have completed
  // (deferred ones are copied on this rank's communication stream).
  void synchronize() const;

 private:
  void check_errors() const;
  void flush_deferred(uintptr_t stream) const;
  std::shared_ptr<MailboxState> box_;
  int rank_;
  std::vector<std::shared_ptr<LocalMessage>> msgs_;
};

class LocalMailbox {
 public:
  // n virtual ranks on CUDA device `device` (comm_streams[r]: rank r's communication stream),
  // or on the CPU (device -1, no streams).
  LocalMailbox(int n, int device, std::vector<uintptr_t> comm_streams);
  ~LocalMailbox();

  // Rank `rank` posts `msgs` (its buffers written / free as of `stream`, the caller's current
  // stream; ignored on the CPU). `keep` (e.g. the tensors) stays referenced until the copies
  // involving them have completed. send_ptrs: (send index, pointer) pairs that replace the
  // list's pointers for this post (a driver's per-call input, same size). Call with the GIL held.
  std::shared_ptr<LocalWork> post(int rank, const MessageList& msgs, uintptr_t stream,
                                   pybind11::object keep,
                                   const std::vector<std::pair<int, uintptr_t>>& send_ptrs);

  // Cut off every message still waiting for its peer (its waits raise MailboxAborted with
  // `reason`) and refuse later posts; idempotent (the first reason stays). Call with the GIL.
  void abort(const std::string& reason);
  // The abort's reason, empty while the mailbox is open.
  std::string aborted() const;

 private:
  std::shared_ptr<MailboxState> state_;
};

}  // namespace esp
