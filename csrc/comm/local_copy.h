#pragma once

#include "../common/esp_common.h"

namespace esp {

// A CUDA event without timing, taken from and returned to a per-device pool; the virtual-rank
// mailbox (local_mailbox.h) records one per post and one per copy batch. torch's Event and
// Stream wrappers cost 5-20 us of Python per call under rank threads (profiled on the H100 host:
// 104 us per one-message exchange on one rank).
class Event {
 public:
  explicit Event(int device);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void record(uintptr_t stream);
  bool query() const;  // true once the work recorded before it has completed
  void synchronize() const;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
  int device_ = 0;
};

// `stream` waits for every event, once per distinct one (enqueued waits: returns at once).
void stream_wait_events(uintptr_t stream, const std::vector<const Event*>& events);

// The virtual-rank messages one post matched: on `stream`, after every event of `waits`, copy
// nbytes[i] from src[i] to dst[i] (same device; one kernel per 16 messages) and record `done`.
void local_copies(const std::vector<uintptr_t>& dst, const std::vector<uintptr_t>& src,
                  const std::vector<int64_t>& nbytes, uintptr_t stream,
                  const std::vector<const Event*>& waits, Event& done, int device);

}  // namespace esp
