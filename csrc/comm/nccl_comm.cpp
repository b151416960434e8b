// Native NCCL communicator of esp_kernels (see nccl_comm.h for the contract).
//
// libnccl is never linked: nccl_load() dlopens the library Python found (the nvidia-nccl-cu13
// wheel) and resolves every entry point used here into function pointers typed from nccl.h, so
// importing esp_kernels._C never needs NCCL.
//
// The world communicator is created NONBLOCKING. Every NCCL call that may return ncclInProgress
// (init, ncclGroupEnd, ncclCommFinalize) is followed by polling ncclCommGetAsyncError until the
// state leaves ncclInProgress, under a deadline. Any error or timeout aborts the communicator
// (ncclCommAbort) and throws NcclError carrying what was being done, NCCL's result code and
// string, and ncclGetLastError's text. Nothing here exits or aborts the process.
//
// Threads: the binding releases the GIL, so calls may overlap. Each communicator has a mutex
// (in its CommState) that guards
// the ncclComm_t. Long host waits check an "abort requested" flag so abort() from another thread
// can interrupt a hung group_p2p/finalize; wait_event() takes the mutex only for its short error
// checks, so other threads can keep issuing work and abort() can get in at any time.
#include "comm/nccl_comm.h"

#include <dlfcn.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>

#include "common/esp_common.h"

namespace esp {

// Per-communicator state behind NcclComm::state_.
struct CommState {
  std::mutex mu;                             // guards NcclComm::comm_ and `closed`
  std::atomic<bool> abort_requested{false};  // abort() from another thread interrupts waits
  const char* closed = nullptr;              // "aborted" / "finalized" once comm_ is gone
};

namespace {

// ---- the dlopen'ed library ---------------------------------------------------------------

struct NcclApi {
  decltype(&::ncclGetVersion) GetVersion = nullptr;
  decltype(&::ncclGetUniqueId) GetUniqueId = nullptr;
  decltype(&::ncclCommInitRankConfig) CommInitRankConfig = nullptr;
  decltype(&::ncclCommGetAsyncError) CommGetAsyncError = nullptr;
  decltype(&::ncclCommFinalize) CommFinalize = nullptr;
  decltype(&::ncclCommDestroy) CommDestroy = nullptr;
  decltype(&::ncclCommAbort) CommAbort = nullptr;
  decltype(&::ncclGetErrorString) GetErrorString = nullptr;
  decltype(&::ncclGetLastError) GetLastError = nullptr;
  decltype(&::ncclGroupStart) GroupStart = nullptr;
  decltype(&::ncclGroupEnd) GroupEnd = nullptr;
  decltype(&::ncclSend) Send = nullptr;
  decltype(&::ncclRecv) Recv = nullptr;
  int version = 0;  // ncclGetVersion code of the loaded library
};

// Nonblocking communicators, ncclCommFinalize and ncclGetLastError need NCCL 2.14.
constexpr int kMinNcclVersion = 21400;

std::mutex g_load_mu;                      // serializes nccl_load
std::atomic<const NcclApi*> g_api{nullptr};  // set once, never freed (the library stays loaded)
std::string g_loaded_path;                 // guarded by g_load_mu
void* g_handle = nullptr;                  // guarded by g_load_mu

const NcclApi& api() {
  const NcclApi* a = g_api.load(std::memory_order_acquire);
  if (a == nullptr)
    throw NcclError(
        "NCCL was not loaded: call esp_kernels.comm.init_nccl(...) first (it loads libnccl.so.2 "
        "from the nvidia-nccl-cu13 wheel through esp_kernels._C.nccl_load)");
  return *a;
}

std::string version_string(int code) {
  // NCCL_VERSION(X,Y,Z): X*1000+Y*100+Z up to 2.8, X*10000+Y*100+Z from 2.9 on.
  int major, minor, patch;
  if (code >= 10000) {
    major = code / 10000;
    minor = (code % 10000) / 100;
    patch = code % 100;
  } else {
    major = code / 1000;
    minor = (code % 1000) / 100;
    patch = code % 100;
  }
  return str_cat(major, ".", minor, ".", patch);
}

const char* result_name(int r) {
  switch (r) {
    case ncclSuccess: return "ncclSuccess";
    case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
    case ncclSystemError: return "ncclSystemError";
    case ncclInternalError: return "ncclInternalError";
    case ncclInvalidArgument: return "ncclInvalidArgument";
    case ncclInvalidUsage: return "ncclInvalidUsage";
    case ncclRemoteError: return "ncclRemoteError";
    case ncclInProgress: return "ncclInProgress";
    case 8: return "ncclTimeout";  // enum member only in NCCL >= 2.29 headers
    default: return "ncclResult";
  }
}

// "ncclRemoteError (remote process exited or ...)" with NCCL's own string.
std::string describe(const NcclApi& a, int r) {
  const char* s = a.GetErrorString(static_cast<ncclResult_t>(r));
  return str_cat(result_name(r), " [", r, "] (", s ? s : "?", ")");
}

// ---- helpers --------------------------------------------------------------------------------

using Clock = std::chrono::steady_clock;

void check_timeout(double t, const char* name) {
  ESP_CHECK(!std::isnan(t) && t > 0, name, " must be > 0 seconds (inf: no timeout), got ", t);
}

class Deadline {
 public:
  explicit Deadline(double seconds) : start_(Clock::now()), infinite_(std::isinf(seconds)) {
    if (!infinite_)
      end_ = start_ + std::chrono::duration_cast<Clock::duration>(
                          std::chrono::duration<double>(seconds));
  }
  bool expired() const { return !infinite_ && Clock::now() >= end_; }

 private:
  Clock::time_point start_, end_;
  bool infinite_;
};

// Poll pacing: yield for the first ~`spin_us` (short waits such as ncclGroupEnd finish in tens
// of microseconds), then sleep `first_sleep_us`, doubling up to 1 ms. A sleep lasts at least the
// kernel's timer slack (50 us by default) more than asked, so the yield phase must cover the
// waits a decode layer or a migration chunk makes: with 50 us of yielding, a 2xH200 run
// (bench/diag_migration.py) spent ~150 us per posted message (8 MiB sends 56 GB/s on a link
// that moves 310 GB/s in one message).
constexpr int kSpinUs = 2000;

class Backoff {
 public:
  Backoff(int spin_us, int first_sleep_us)
      : start_(Clock::now()), spin_(std::chrono::microseconds(spin_us)),
        sleep_(std::chrono::microseconds(first_sleep_us)) {}
  void pause() {
    if (Clock::now() - start_ < spin_) {
      std::this_thread::yield();
      return;
    }
    std::this_thread::sleep_for(sleep_);
    sleep_ = std::min(sleep_ * 2, std::chrono::microseconds(1000));
  }

 private:
  Clock::time_point start_;
  std::chrono::microseconds spin_, sleep_;
};

// Saves and restores the calling thread's current device without ever throwing (for abort paths
// and destructors; DeviceGuard from esp_common.h throws).
class QuietDeviceGuard {
 public:
  explicit QuietDeviceGuard(int device) {
    ok_ = cudaGetDevice(&prev_) == cudaSuccess;
    if (ok_ && prev_ != device) {
      if (cudaSetDevice(device) != cudaSuccess) ok_ = false;
    }
    if (!ok_) (void)cudaGetLastError();
  }
  ~QuietDeviceGuard() {
    if (ok_) (void)cudaSetDevice(prev_);
  }
  QuietDeviceGuard(const QuietDeviceGuard&) = delete;
  QuietDeviceGuard& operator=(const QuietDeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool ok_ = false;
};

// Aborts `comm` (never throws). Caller holds the state's mutex.
void abort_comm(void*& comm, CommState& st, int device) noexcept {
  if (comm == nullptr) return;
  const NcclApi* a = g_api.load(std::memory_order_acquire);
  if (a != nullptr) {
    QuietDeviceGuard guard(device);
    (void)a->CommAbort(static_cast<ncclComm_t>(comm));  // blocking even for nonblocking comms
  }
  comm = nullptr;
  st.closed = "aborted";
}

[[noreturn]] void throw_closed(const CommState& st) {
  throw NcclError(str_cat("NCCL communicator was ", st.closed ? st.closed : "closed",
                          "; create a new one with esp_kernels.comm.init_nccl"));
}

}  // namespace

// ---- library loading ------------------------------------------------------------------------

void nccl_load(const std::string& library_path) {
  ESP_CHECK(!library_path.empty(), "nccl_load: library_path is empty");
  std::lock_guard<std::mutex> lock(g_load_mu);
  if (g_api.load(std::memory_order_acquire) != nullptr) {
    if (library_path == g_loaded_path) return;
    // The same file under another name (symlink, relative path) is fine too.
    void* h = dlopen(library_path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (h != nullptr) {
      const bool same = h == g_handle;
      dlclose(h);  // drop the reference RTLD_NOLOAD added
      if (same) return;
    }
    throw NcclError(str_cat("NCCL is already loaded from '", g_loaded_path,
                            "'; cannot load another library '", library_path,
                            "' in the same process"));
  }

  dlerror();
  void* handle = dlopen(library_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = dlerror();
    throw NcclError(str_cat("cannot load NCCL from '", library_path, "': ",
                            err ? err : "dlopen failed",
                            " (install the nvidia-nccl-cu13 wheel or set ESP_NCCL_LIBRARY)"));
  }

  auto* a = new NcclApi();
  std::string missing;
  auto resolve = [&](auto& fn, const char* name) {
    dlerror();
    void* sym = dlsym(handle, name);
    if (sym == nullptr) {
      if (!missing.empty()) missing += ", ";
      missing += name;
      return;
    }
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(sym);
  };
  resolve(a->GetVersion, "ncclGetVersion");
  resolve(a->GetUniqueId, "ncclGetUniqueId");
  resolve(a->CommInitRankConfig, "ncclCommInitRankConfig");
  resolve(a->CommGetAsyncError, "ncclCommGetAsyncError");
  resolve(a->CommFinalize, "ncclCommFinalize");
  resolve(a->CommDestroy, "ncclCommDestroy");
  resolve(a->CommAbort, "ncclCommAbort");
  resolve(a->GetErrorString, "ncclGetErrorString");
  resolve(a->GetLastError, "ncclGetLastError");
  resolve(a->GroupStart, "ncclGroupStart");
  resolve(a->GroupEnd, "ncclGroupEnd");
  resolve(a->Send, "ncclSend");
  resolve(a->Recv, "ncclRecv");
  if (!missing.empty()) {
    delete a;
    dlclose(handle);
    throw NcclError(str_cat("'", library_path, "' is not a usable NCCL library: missing ",
                            missing, " (esp_kernels needs NCCL >= ",
                            version_string(kMinNcclVersion), ")"));
  }
  int code = 0;
  ncclResult_t r = a->GetVersion(&code);
  if (r != ncclSuccess || code < kMinNcclVersion) {
    delete a;
    dlclose(handle);
    if (r != ncclSuccess)
      throw NcclError(str_cat("ncclGetVersion failed for '", library_path, "' (result ", r, ")"));
    throw NcclError(str_cat("NCCL ", version_string(code), " at '", library_path,
                            "' is too old: esp_kernels needs NCCL >= ",
                            version_string(kMinNcclVersion),
                            " (nonblocking communicators, ncclCommFinalize)"));
  }
  a->version = code;
  g_handle = handle;
  g_loaded_path = library_path;
  g_api.store(a, std::memory_order_release);
}

bool nccl_is_loaded() { return g_api.load(std::memory_order_acquire) != nullptr; }

std::string nccl_version() { return version_string(api().version); }

std::string nccl_unique_id() {
  const NcclApi& a = api();
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  ncclResult_t r = a.GetUniqueId(&id);
  if (r != ncclSuccess) {
    const char* last = a.GetLastError(nullptr);
    throw NcclError(str_cat("NCCL error while creating a unique id (ncclGetUniqueId): ",
                            describe(a, r),
                            (last && *last) ? str_cat("; last NCCL error: ", last) : ""));
  }
  return std::string(id.internal, sizeof(id.internal));
}

// ---- communicator -----------------------------------------------------------------------------

NcclComm::NcclComm(const std::string& unique_id, int rank, int world_size, int device,
                   double timeout_s, bool blocking)
    : rank_(rank), world_size_(world_size), device_(device), timeout_s_(timeout_s) {
  const NcclApi& a = api();
  ESP_CHECK(unique_id.size() == sizeof(ncclUniqueId), "NcclComm: unique_id must be ",
            sizeof(ncclUniqueId), " bytes (from nccl_unique_id()), got ", unique_id.size());
  ESP_CHECK(world_size >= 1, "NcclComm: world_size must be >= 1, got ", world_size);
  ESP_CHECK(rank >= 0 && rank < world_size, "NcclComm: rank ", rank,
            " is outside the world of size ", world_size);
  check_timeout(timeout_s, "NcclComm: timeout_s");
  int ndev = 0;
  cudaError_t ce = cudaGetDeviceCount(&ndev);
  if (ce != cudaSuccess) {
    (void)cudaGetLastError();
    throw NcclError(str_cat("cannot create an NCCL communicator: no usable CUDA device "
                            "(cudaGetDeviceCount: ", cudaGetErrorString(ce), ")"));
  }
  ESP_CHECK(device >= 0 && device < ndev, "NcclComm: device ", device, " does not exist (",
            ndev, " CUDA device(s) visible)");

  state_ = std::make_unique<CommState>();
  CommState& st = *state_;
  DeviceGuard guard(device);
  ncclUniqueId id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = blocking ? 1 : 0;
  ncclComm_t comm = nullptr;
  ncclResult_t r = a.CommInitRankConfig(&comm, world_size, id, rank, &config);
  comm_ = comm;  // may be set even when r is an error (nonblocking init): fail() aborts it
  const std::string what = str_cat("creating the communicator (ncclCommInitRankConfig, rank ",
                                   rank, " of ", world_size, " on device ", device, ")");
  std::lock_guard<std::mutex> lock(st.mu);
  if (r != ncclSuccess && r != ncclInProgress) fail(what, r);
  if (comm_ == nullptr) fail(what, ncclInternalError);
  wait_ready(what.c_str());
}

NcclComm::~NcclComm() {
  try {
    std::lock_guard<std::mutex> lock(state_->mu);
    abort_comm(comm_, *state_, device_);  // neither finalized nor aborted: abort (never destroy:
                                          // a clean destroy could wait forever on peers)
  } catch (...) {
  }
}

// Polls ncclCommGetAsyncError until the communicator leaves ncclInProgress. Caller holds the
// state's mutex (or is the constructor) and has set the device.
void NcclComm::wait_ready(const char* what) {
  const NcclApi& a = api();
  CommState& st = *state_;
  Deadline deadline(timeout_s_);
  Backoff backoff(kSpinUs, /*first_sleep_us=*/20);
  for (;;) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t r = a.CommGetAsyncError(static_cast<ncclComm_t>(comm_), &state);
    if (r != ncclSuccess) fail(str_cat(what, " [ncclCommGetAsyncError]"), r);
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) fail(what, state);
    if (st.abort_requested.load(std::memory_order_acquire))
      fail(str_cat("interrupted by abort() from another thread while ", what), ncclInProgress);
    if (deadline.expired())
      fail(str_cat("timed out after ", timeout_s_, " s while ", what), ncclInProgress);
    backoff.pause();
  }
}

// Builds the message (reading ncclGetLastError before the communicator goes), aborts the
// communicator and throws. Caller holds the state's mutex (or is the constructor).
void NcclComm::fail(const std::string& what, int result) {
  const NcclApi& a = api();
  std::string msg;
  if (result == ncclInProgress) {  // timeouts and interruptions: `what` says it all
    msg = str_cat("NCCL ", what, " (still ", describe(a, result), ")");
  } else {
    msg = str_cat("NCCL error while ", what, ": ", describe(a, result));
  }
  const char* last = a.GetLastError(static_cast<ncclComm_t>(comm_));
  if (last && *last) msg += str_cat("; last NCCL error: ", last);
  msg += str_cat(" [rank ", rank_, " of ", world_size_, ", device ", device_, "]");
  if (comm_ != nullptr) {
    abort_comm(comm_, *state_, device_);
    msg += "; the communicator was aborted";
  }
  throw NcclError(msg);
}

void NcclComm::group_p2p(const std::vector<P2POp>& ops, uintptr_t stream) {
  for (size_t i = 0; i < ops.size(); ++i) {
    const P2POp& op = ops[i];
    ESP_CHECK(op.peer >= 0 && op.peer < world_size_, "group_p2p: ops[", i, "] (",
              op.is_send ? "send" : "recv", ") peer ", op.peer,
              " is not a rank of the world of size ", world_size_);
    ESP_CHECK(op.nbytes >= 0, "group_p2p: ops[", i, "] has negative nbytes ", op.nbytes);
    ESP_CHECK(op.nbytes == 0 || op.ptr != 0, "group_p2p: ops[", i, "] has a null pointer for ",
              op.nbytes, " bytes");
  }
  const NcclApi& a = api();
  CommState& st = *state_;
  std::lock_guard<std::mutex> lock(st.mu);
  if (comm_ == nullptr) throw_closed(st);
  if (st.abort_requested.load(std::memory_order_acquire)) {
    abort_comm(comm_, st, device_);
    throw_closed(st);
  }
  bool any = false;
  for (const P2POp& op : ops) any = any || op.nbytes > 0;
  if (!any) return;  // matched pairs have equal sizes, so the peer skips them as well

  DeviceGuard guard(device_);
  auto comm = static_cast<ncclComm_t>(comm_);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  ncclResult_t r = a.GroupStart();
  if (r != ncclSuccess) fail("starting a send/recv group (ncclGroupStart)", r);
  ncclResult_t post_err = ncclSuccess;
  std::string post_what;
  for (size_t i = 0; i < ops.size(); ++i) {
    const P2POp& op = ops[i];
    if (op.nbytes == 0) continue;
    const size_t count = static_cast<size_t>(op.nbytes);
    r = op.is_send ? a.Send(reinterpret_cast<const void*>(op.ptr), count, ncclUint8, op.peer,
                            comm, s)
                   : a.Recv(reinterpret_cast<void*>(op.ptr), count, ncclUint8, op.peer, comm, s);
    if (r != ncclSuccess && r != ncclInProgress) {
      post_err = r;
      post_what = str_cat("posting ", op.is_send ? "ncclSend to" : "ncclRecv from", " peer ",
                          op.peer, " (ops[", i, "], ", op.nbytes, " bytes)");
      break;
    }
  }
  r = a.GroupEnd();  // always close the group, also after a failed post
  if (post_err != ncclSuccess) fail(post_what, post_err);
  if (r == ncclInProgress) {
    wait_ready(str_cat("launching ", ops.size(), " grouped send/recv op(s) (ncclGroupEnd)").c_str());
  } else if (r != ncclSuccess) {
    fail(str_cat("launching ", ops.size(), " grouped send/recv op(s) (ncclGroupEnd)"), r);
  }
}

void NcclComm::check() {
  const NcclApi& a = api();
  CommState& st = *state_;
  std::lock_guard<std::mutex> lock(st.mu);
  if (comm_ == nullptr) throw_closed(st);
  ncclResult_t state = ncclSuccess;
  ncclResult_t r = a.CommGetAsyncError(static_cast<ncclComm_t>(comm_), &state);
  if (r != ncclSuccess) fail("checking for asynchronous errors (ncclCommGetAsyncError)", r);
  if (state != ncclSuccess && state != ncclInProgress)
    fail("checking for asynchronous errors (ncclCommGetAsyncError)", state);
}

void NcclComm::wait_event(uintptr_t event, double timeout_s) {
  ESP_CHECK(event != 0, "wait_event: event is null");
  check_timeout(timeout_s, "wait_event: timeout_s");
  const NcclApi& a = api();
  CommState& st = *state_;
  auto ev = reinterpret_cast<cudaEvent_t>(event);
  DeviceGuard guard(device_);
  Deadline deadline(timeout_s);
  Backoff backoff(kSpinUs, /*first_sleep_us=*/50);
  for (;;) {
    // The event first, the communicator's state second: an abort ends NCCL's kernels early, so
    // an event reached after an error must not count as a completed transfer.
    cudaError_t e = cudaEventQuery(ev);
    if (e != cudaSuccess && e != cudaErrorNotReady) {
      (void)cudaGetLastError();  // clear a non-sticky error from this runtime's thread state
      throw std::runtime_error(str_cat("CUDA error while waiting for NCCL communication to "
                                       "complete (cudaEventQuery): ", cudaGetErrorName(e), ": ",
                                       cudaGetErrorString(e)));
    }
    {
      // Short critical section: other threads may post work or abort between polls.
      std::lock_guard<std::mutex> lock(st.mu);
      if (comm_ == nullptr) throw_closed(st);
      ncclResult_t state = ncclSuccess;
      ncclResult_t r = a.CommGetAsyncError(static_cast<ncclComm_t>(comm_), &state);
      if (r != ncclSuccess)
        fail("waiting for communication to complete [ncclCommGetAsyncError]", r);
      if (state != ncclSuccess && state != ncclInProgress)
        fail("waiting for communication to complete", state);
    }
    if (e == cudaSuccess) return;
    if (deadline.expired()) {
      std::lock_guard<std::mutex> lock(st.mu);
      if (comm_ == nullptr) throw_closed(st);
      fail(str_cat("timed out after ", timeout_s,
                   " s waiting for send/recv work to complete (its CUDA event was not reached; "
                   "a peer may not have posted the matching operation)"),
           ncclInProgress);
    }
    backoff.pause();
  }
}

void NcclComm::abort() {
  CommState& st = *state_;
  st.abort_requested.store(true, std::memory_order_release);  // interrupts a wait in progress
  std::lock_guard<std::mutex> lock(st.mu);
  abort_comm(comm_, st, device_);  // no-op when already aborted or finalized
}

void NcclComm::finalize() {
  const NcclApi& a = api();
  CommState& st = *state_;
  std::lock_guard<std::mutex> lock(st.mu);
  if (comm_ == nullptr) return;  // idempotent (also after abort)
  if (st.abort_requested.load(std::memory_order_acquire)) {
    abort_comm(comm_, st, device_);
    return;
  }
  DeviceGuard guard(device_);
  ncclResult_t r = a.CommFinalize(static_cast<ncclComm_t>(comm_));
  if (r != ncclSuccess && r != ncclInProgress)
    fail("finalizing the communicator (ncclCommFinalize)", r);
  wait_ready("finalizing the communicator (ncclCommFinalize)");
  r = a.CommDestroy(static_cast<ncclComm_t>(comm_));
  comm_ = nullptr;  // finalized: the destroy released it (or failed without a safe retry)
  st.closed = "finalized";
  if (r != ncclSuccess) {
    const char* last = a.GetLastError(nullptr);
    throw NcclError(str_cat("NCCL error while destroying the finalized communicator "
                            "(ncclCommDestroy): ", describe(a, r),
                            (last && *last) ? str_cat("; last NCCL error: ", last) : "",
                            " [rank ", rank_, " of ", world_size_, ", device ", device_, "]"));
  }
}

bool NcclComm::valid() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return comm_ != nullptr;
}

}  // namespace esp
