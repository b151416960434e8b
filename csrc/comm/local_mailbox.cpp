// Message matching of virtual ranks (see local_mailbox.h).
#include "local_mailbox.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace py = pybind11;

namespace esp {

struct MailboxState {
  int n = 0;
  int device = -1;  // -1: CPU
  std::vector<uintptr_t> comm_streams;
  std::mutex mu;
  std::condition_variable cv;  // notified whenever messages get matched
  // [src * n + dst]: messages posted by exactly one side so far, oldest first.
  std::vector<std::deque<std::shared_ptr<LocalMessage>>> pending_sends, pending_recvs;
  // Copies the GPU may still run, oldest first, with the objects they read or write.
  struct Inflight {
    std::shared_ptr<Event> done;
    std::vector<py::object> keep;
  };
  std::deque<Inflight> inflight;
  // Rounds of consume-at-once exchanges (see local_mailbox.h): messages whose copy waits for the
  // round's last poster, and how many halves posted at once are still waiting for their peer.
  std::vector<std::shared_ptr<LocalMessage>> deferred;
  int64_t pending_at_once = 0;
  // Objects of deferred messages whose copy failed: kept until the mailbox goes (a copy kernel
  // launched before the failure may still use them; a flush may run without the GIL).
  std::vector<py::object> orphans;
  std::string aborted;  // the abort's reason; empty while open

  ~MailboxState() {
    // The objects may be released only once the copies that use them have completed. No throw
    // here: at interpreter exit the driver may already be shutting down.
    for (Inflight& f : inflight) cudaEventSynchronize(f.done->get());
  }
};

namespace {

std::string mismatch_error(const LocalMessage& m) {
  return "message " + std::to_string(m.src) + "->" + std::to_string(m.dst) + ": sent " +
         std::to_string(m.send.numel) + " x " + m.send.dtype + " but the receive buffer holds " +
         std::to_string(m.recv.numel) + " x " + m.recv.dtype;
}

// One copy kernel on `stream` for `msgs` (box lock held), after the ready event of each side
// posted on another stream (a side without one was posted on `stream` by the current post) and
// `extra_wait`; records their done event. `keep` (the objects the copies read or write) moves to
// the inflight list only once the copies are enqueued: on a throw the caller still holds it.
void copy_batch(MailboxState& s, const std::vector<LocalMessage*>& msgs, uintptr_t stream,
                const Event* extra_wait, std::vector<py::object>& keep) {
  std::vector<uintptr_t> dst, src;
  std::vector<int64_t> nbytes;
  std::vector<const Event*> waits;
  for (const LocalMessage* m : msgs) {
    dst.push_back(m->recv.ptr);
    src.push_back(m->send.ptr);
    nbytes.push_back(m->send.numel * m->send.elem_size);
    if (m->send_ready && m->send_stream != stream) waits.push_back(m->send_ready.get());
    if (m->recv_ready && m->recv_stream != stream) waits.push_back(m->recv_ready.get());
  }
  if (extra_wait != nullptr) waits.push_back(extra_wait);
  auto done = std::make_shared<Event>(s.device);
  local_copies(dst, src, nbytes, stream, waits, *done, s.device);
  for (LocalMessage* m : msgs) {
    m->done = done;
    m->copy_stream = stream;
  }
  s.inflight.push_back(MailboxState::Inflight{std::move(done), std::move(keep)});
}

// Copies every deferred message on `stream` (box lock held). Only moves Python objects:
// synchronize() runs it without the GIL.
void flush_locked(MailboxState& s, uintptr_t stream) {
  if (s.deferred.empty()) return;
  std::vector<std::shared_ptr<LocalMessage>> owned;
  owned.swap(s.deferred);
  std::vector<LocalMessage*> msgs;
  std::vector<py::object> keep;
  for (const auto& m : owned) {
    m->deferred = false;
    msgs.push_back(m.get());
    keep.push_back(std::move(m->first_keep));
    keep.push_back(std::move(m->second_keep));
  }
  try {
    copy_batch(s, msgs, stream, nullptr, keep);
  } catch (const std::exception& e) {
    for (LocalMessage* m : msgs)
      m->error = std::string("virtual-rank message copy failed: ") + e.what();
    for (py::object& o : keep) s.orphans.push_back(std::move(o));
    throw;
  }
}

}  // namespace

LocalMailbox::LocalMailbox(int n, int device, std::vector<uintptr_t> comm_streams)
    : state_(std::make_shared<MailboxState>()) {
  ESP_CHECK(n >= 1, "LocalMailbox: n must be >= 1, got ", n);
  ESP_CHECK(device >= -1, "LocalMailbox: device must be a CUDA index or -1 (CPU), got ", device);
  ESP_CHECK(device < 0 || static_cast<int>(comm_streams.size()) == n,
            "LocalMailbox: one communication stream per rank on CUDA, got ",
            comm_streams.size(), " for ", n, " ranks");
  state_->n = n;
  state_->device = device;
  state_->comm_streams = std::move(comm_streams);
  state_->pending_sends.resize(static_cast<size_t>(n) * n);
  state_->pending_recvs.resize(static_cast<size_t>(n) * n);
}

LocalMailbox::~LocalMailbox() = default;

std::shared_ptr<LocalWork> LocalMailbox::post(
    int rank, const MessageList& msgs, uintptr_t stream, py::object keep,
    const std::vector<std::pair<int, uintptr_t>>& send_ptrs) {
  MailboxState& s = *state_;
  const int n = s.n;
  ESP_CHECK(rank >= 0 && rank < n, "LocalMailbox.post: rank ", rank, " outside [0, ", n, ")");
  for (const auto* list : {&msgs.sends, &msgs.recvs})
    for (const MessageSpec& m : *list)
      ESP_CHECK(m.peer >= 0 && m.peer < n, "LocalMailbox.post: peer ", m.peer, " outside [0, ",
                n, ")");
  for (const auto& [i, ptr] : send_ptrs)
    ESP_CHECK(i >= 0 && i < static_cast<int>(msgs.sends.size()), "LocalMailbox.post: send index ",
              i, " outside the list's ", msgs.sends.size(), " sends");
  const bool cuda = s.device >= 0;
  std::vector<std::shared_ptr<LocalMessage>> mine;
  mine.reserve(msgs.sends.size() + msgs.recvs.size());
  // Dropped after the lock is released (a decref may run arbitrary Python).
  std::vector<py::object> released;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.aborted.empty()) throw MailboxAborted(s.aborted);
    try {
      // One cudaEventQuery per finished copy however seldom this polls (polling only every
      // 8 copies still counted 1.04 queries per decode layer and rank on 2 ranks).
      while (!s.inflight.empty() && s.inflight.front().done->query()) {
        for (py::object& o : s.inflight.front().keep) released.push_back(std::move(o));
        s.inflight.pop_front();
      }
      std::vector<LocalMessage*> batch;  // matched here, copied by this post's kernel (CUDA)
      std::vector<py::object> batch_keep;  // the first posters' objects of `batch`
      // This post's side of each of its messages, (message, is_send): the ones still pending or
      // deferred after it get this rank's ready event below.
      std::vector<std::pair<LocalMessage*, bool>> sides;
      const bool at_once = cuda && msgs.consume_at_once;
      bool any = false;
      auto match = [&](const std::shared_ptr<LocalMessage>& mp) {
        LocalMessage& m = *mp;
        any = true;
        if (m.first_at_once) --s.pending_at_once;
        if (!m.error.empty()) {
          // The first poster failed (see the catch below): the error reaches this side's wait.
        } else if (m.send.numel != m.recv.numel || m.send.dtype != m.recv.dtype) {
          m.error = mismatch_error(m);
        } else if (!cuda) {  // memmove: a rank may send part of a buffer into another part
          const int64_t bytes = m.send.numel * m.send.elem_size;
          if (bytes > 0)
            std::memmove(reinterpret_cast<void*>(m.recv.ptr),
                         reinterpret_cast<const void*>(m.send.ptr), static_cast<size_t>(bytes));
        } else if (at_once && m.first_at_once) {  // copied by the round's last poster
          m.second_keep = keep;
          m.deferred = true;
          s.deferred.push_back(mp);
          m.matched.store(true, std::memory_order_release);
          return;  // its objects stay with it until the copy
        } else {
          batch.push_back(&m);
          batch_keep.push_back(std::move(m.first_keep));
          return;  // matched once its copy is enqueued
        }
        released.push_back(std::move(m.first_keep));
        m.matched.store(true, std::memory_order_release);
      };
      // One side of a message: match the other side's oldest pending half of this (src, dst)
      // pair, or queue this half.
      auto post_side = [&](const MessageSpec& spec, bool is_send) {
        const int src = is_send ? rank : spec.peer, dst = is_send ? spec.peer : rank;
        const size_t pair = static_cast<size_t>(src) * n + dst;
        auto& other = (is_send ? s.pending_recvs : s.pending_sends)[pair];
        std::shared_ptr<LocalMessage> m;
        if (!other.empty()) {
          m = std::move(other.front());
          other.pop_front();
          (is_send ? m->send : m->recv) = spec;
          (is_send ? m->send_stream : m->recv_stream) = stream;
          match(m);
        } else {
          m = std::make_shared<LocalMessage>();
          m->src = src;
          m->dst = dst;
          (is_send ? m->send : m->recv) = spec;
          (is_send ? m->send_stream : m->recv_stream) = stream;
          m->first_keep = keep;
          m->first_at_once = at_once;
          if (at_once) ++s.pending_at_once;
          (is_send ? s.pending_sends : s.pending_recvs)[pair].push_back(m);
        }
        sides.emplace_back(m.get(), is_send);
        mine.push_back(std::move(m));
      };
      for (size_t si = 0; si < msgs.sends.size(); ++si) {
        MessageSpec spec = msgs.sends[si];
        for (const auto& [i, ptr] : send_ptrs)
          if (i == static_cast<int>(si)) spec.ptr = ptr;
        post_side(spec, true);
      }
      for (const MessageSpec& spec : msgs.recvs) post_side(spec, false);

      // This rank's ready event: its buffers as of now on `stream`. Needed by a copy on the
      // communication stream and by the peers that will match the fresh messages.
      std::shared_ptr<Event> ready;
      auto my_ready = [&] {
        if (!ready) {
          ready = std::make_shared<Event>(s.device);
          ready->record(stream);
        }
        return ready.get();
      };
      if (!batch.empty()) {
        // On this rank's communication stream, after its ready event (this post's sides have
        // none: they are assigned only to messages left pending), so its compute overlaps the
        // copies (ring prefill's KV blocks).
        batch_keep.push_back(keep);
        copy_batch(s, batch, s.comm_streams[rank], my_ready(), batch_keep);
        for (LocalMessage* m : batch) m->matched.store(true, std::memory_order_release);
      }
      // The last poster of a round of consume-at-once exchanges copies the round: 4 ranks
      // exchanging all-to-all then cost 3 ready events, 3 waits on them, one copy, one done
      // event and 3 waits on it (11 driver calls) instead of 21 with a copy per matching post.
      if (at_once && s.pending_at_once == 0) flush_locked(s, stream);
      if (cuda) {
        for (auto& [m, is_send] : sides) {
          // Still pending (its peer's post will wait on this) or still deferred (the flush will).
          if (m->matched.load(std::memory_order_relaxed) && !m->deferred) continue;
          my_ready();
          (is_send ? m->send_ready : m->recv_ready) = ready;
        }
      }
      if (any) s.cv.notify_all();
    } catch (const std::exception& e) {
      // A failed event or copy (a CUDA error): every message of this post that is not matched
      // yet carries the error, so neither side waits for it until its timeout; a peer that
      // matches one later gets the error at its wait. A message this post deferred and no flush
      // has copied carries it too and leaves the round: it never got this rank's ready event, so
      // a later copy would not wait for this rank's stream.
      const std::string error =
          "virtual-rank message failed on rank " + std::to_string(rank) + ": " + e.what();
      for (auto& m : mine) {
        if (m->deferred) {
          m->deferred = false;
          m->error = error;
          s.deferred.erase(std::remove(s.deferred.begin(), s.deferred.end(), m),
                           s.deferred.end());
          released.push_back(std::move(m->first_keep));
          released.push_back(std::move(m->second_keep));
          continue;
        }
        if (m->matched.load(std::memory_order_relaxed)) continue;
        m->error = error;
        m->matched.store(true, std::memory_order_release);
      }
      s.cv.notify_all();
      throw;
    }
  }
  return std::make_shared<LocalWork>(state_, rank, std::move(mine));
}

void LocalMailbox::abort(const std::string& reason) {
  MailboxState& s = *state_;
  std::vector<py::object> released;  // dropped after the lock (a decref may run Python)
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.aborted.empty()) return;
    s.aborted = reason.empty() ? std::string("the virtual-rank world was aborted") : reason;
    for (auto* queues : {&s.pending_sends, &s.pending_recvs})
      for (auto& q : *queues) {
        for (auto& m : q) {
          m->error = s.aborted;
          m->aborted = true;
          released.push_back(std::move(m->first_keep));  // never copied: nothing reads it
          m->matched.store(true, std::memory_order_release);
        }
        q.clear();
      }
    s.pending_at_once = 0;  // deferred messages are copied by the waits that need them
    s.cv.notify_all();
  }
}

std::string LocalMailbox::aborted() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->aborted;
}

bool LocalWork::matched() const {
  for (const auto& m : msgs_)
    if (!m->matched.load(std::memory_order_acquire)) return false;
  return true;
}

bool LocalWork::wait_matched(double timeout_s) const {
  if (matched()) return true;
  std::unique_lock<std::mutex> lock(box_->mu);
  auto done = [this] { return matched(); };
  // Beyond ~10^8 s (and for inf) the duration would overflow the clock's ticks: no deadline.
  if (!(timeout_s < 1e8)) {
    box_->cv.wait(lock, done);
    return true;
  }
  return box_->cv.wait_for(lock, std::chrono::duration<double>(std::max(timeout_s, 0.0)), done);
}

std::pair<int, int> LocalWork::first_unmatched() const {
  for (const auto& m : msgs_)
    if (!m->matched.load(std::memory_order_acquire)) return {m->src, m->dst};
  return {-1, -1};
}

void LocalWork::check_errors() const {
  if (!matched()) throw std::runtime_error("LocalWork: waited on before every message was matched");
  for (const auto& m : msgs_)
    if (m->aborted) throw MailboxAborted(m->error);
  for (const auto& m : msgs_) ESP_CHECK(m->error.empty(), m->error);
}

void LocalWork::flush_deferred(uintptr_t stream) const {
  if (box_->device < 0 || !matched()) return;  // check_errors reports the unmatched
  std::lock_guard<std::mutex> lock(box_->mu);
  for (const auto& m : msgs_)
    if (m->deferred) {
      flush_locked(*box_, stream);
      return;
    }
}

void LocalWork::wait(uintptr_t stream) const {
  flush_deferred(stream);
  check_errors();
  if (box_->device < 0) return;
  std::vector<const Event*> done;  // copies enqueued on `stream` itself need no wait
  for (const auto& m : msgs_)
    if (m->copy_stream != stream) done.push_back(m->done.get());
  stream_wait_events(stream, done);
}

void LocalWork::synchronize() const {
  if (box_->device >= 0) flush_deferred(box_->comm_streams[rank_]);
  check_errors();
  if (box_->device < 0) return;
  const Event* last = nullptr;  // the messages of one post share their done event
  for (const auto& m : msgs_) {
    if (m->done.get() == last) continue;
    last = m->done.get();
    last->synchronize();
  }
}

}  // namespace esp
