#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace esp {

// NCCL failures and timeouts: surface in Python as esp_kernels.NcclError (a RuntimeError).
class NcclError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// libnccl is loaded with dlopen on first use (path found by Python in the nvidia-nccl-cu13
// wheel), so importing the module never fails for lack of NCCL.
void nccl_load(const std::string& library_path);
bool nccl_is_loaded();
std::string nccl_version();
std::string nccl_unique_id();  // raw ncclUniqueId bytes

struct CommState;  // mutex, abort flag and closed reason (nccl_comm.cpp)

// One point-to-point operation of a grouped exchange.
struct P2POp {
  bool is_send;
  uintptr_t ptr;
  int64_t nbytes;
  int peer;  // world rank
};

// A world communicator (blocking by default, as init_nccl). Every NCCL error and a timeout become
// NcclError with NCCL's message; the communicator is then aborted. Never calls exit().
class NcclComm {
 public:
  // blocking=true (default, as init_nccl): group launches are enqueued directly (an exchange of 4
  // bytes plus its synchronize took 50 us on 2xH200 against 138 us nonblocking), but creation
  // waits for every peer without a timeout (init_nccl checks the ranks in through its store
  // first). blocking=false: creation and every NCCL call honour the timeout; NCCL enqueues each
  // group launch from a helper thread.
  NcclComm(const std::string& unique_id, int rank, int world_size, int device, double timeout_s,
           bool blocking = true);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const { return rank_; }
  int size() const { return world_size_; }
  int device() const { return device_; }

  // All ops issued inside one ncclGroupStart/End on `stream` (sends to self included).
  void group_p2p(const std::vector<P2POp>& ops, uintptr_t stream);
  // Raise NcclError if the communicator reported an asynchronous error.
  void check();
  // Host-wait until `event` (a cudaEvent_t recorded after NCCL work) completes, polling for NCCL
  // errors; on timeout abort the communicator and raise NcclError.
  void wait_event(uintptr_t event, double timeout_s);
  void abort();
  void finalize();  // flush and destroy cleanly
  bool valid() const;

 private:
  void* comm_ = nullptr;  // ncclComm_t, guarded by state_->mu
  std::unique_ptr<CommState> state_;  // set by the constructor before any use
  int rank_ = 0, world_size_ = 0, device_ = 0;
  double timeout_s_ = 0;
  void wait_ready(const char* what);
  [[noreturn]] void fail(const std::string& what, int result);
};

}  // namespace esp
