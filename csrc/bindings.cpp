// esp_kernels._C: the one pybind11 module binding the torch-free core.
//
// Every op takes TensorDesc values (pointer, dtype code, shape, strides), a device index and a raw
// cudaStream_t; esp_kernels/_core.py builds them from torch tensors. std::invalid_argument maps
// to ValueError, std::runtime_error to RuntimeError, esp::NcclError to esp_kernels._C.NcclError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "comm/local_mailbox.h"
#include "comm/nccl_comm.h"
#include "common/esp_common.h"
#include "decode/decode_partial.h"
#include "kvcache/copy_rows.h"
#include "merge/merge_states.h"

#ifndef ESP_CUDA_ARCHS
#define ESP_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
using esp::TensorDesc;

PYBIND11_MODULE(_C, m) {
  m.doc() = "esp_kernels compiled core (torch-free CUDA kernels and NCCL communicator)";
  m.def("built_archs", [] { return std::string(ESP_CUDA_ARCHS); });

  py::class_<TensorDesc>(m, "TensorDesc")
      .def(py::init([](uintptr_t ptr, int dtype, std::vector<int64_t> shape,
                       std::vector<int64_t> strides) {
             ESP_CHECK(shape.size() == strides.size(), "TensorDesc: shape/strides rank mismatch");
             return TensorDesc{ptr, static_cast<esp::DType>(dtype), std::move(shape),
                               std::move(strides)};
           }),
           py::arg("ptr"), py::arg("dtype"), py::arg("shape"), py::arg("strides"))
      // Writable: a driver keeps one descriptor per fixed-shape operand and only swaps the
      // pointer per call (building one costs ~2 us of the 30 us per-layer host budget).
      .def_readwrite("ptr", &TensorDesc::ptr)
      .def_readonly("shape", &TensorDesc::shape)
      .def_readonly("strides", &TensorDesc::strides);

  m.def("merge_states", &esp::merge_states, py::arg("o"), py::arg("lse"), py::arg("out"),
        py::arg("lse_out"), py::arg("device"), py::arg("stream"),
        "Merge S states o [S,T,H,D], lse [S,T,H] into out [T,H,D], lse_out [T,H] (may alias "
        "state 0).");
  m.def("merge_states_gather", &esp::merge_states_gather, py::arg("o"), py::arg("lse"),
        py::arg("rows"), py::arg("out"), py::arg("lse_out"), py::arg("device"), py::arg("stream"),
        "Merge, for each row t, the states at pool rows rows[:, t] of o [R,H,D], lse [R,H].");

  m.def("decode_partial", &esp::decode_partial, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_table"), py::arg("kv_lens"), py::arg("o"),
        py::arg("lse"), py::arg("workspace"), py::arg("num_splits"), py::arg("softmax_scale"),
        py::arg("deterministic"), py::arg("device"), py::arg("stream"),
        py::arg("counters_zeroed") = false, py::arg("kv_evict_first") = false,
        "Partial decode attention over a paged KV shard: (o, lse) per request.");
  m.def("decode_workspace_elems", &esp::decode_workspace_elems, py::arg("batch"),
        py::arg("num_q_heads"), py::arg("head_dim"), py::arg("num_splits"));

  m.def("copy_rows", &esp::copy_rows, py::arg("src"), py::arg("src_idx"), py::arg("dst"),
        py::arg("dst_idx"), py::arg("device"), py::arg("stream"),
        "dst[o, dst_idx[i]] = src[o, src_idx[i]] (retention writes, KV pack/unpack).");

  // ---- virtual-rank messages (esp_kernels/comm/local.py) ----
  using Spec = std::tuple<uintptr_t, int64_t, int64_t, std::string, int>;
  py::class_<esp::MessageList>(m, "MessageList")
      .def(py::init([](const std::vector<Spec>& sends, const std::vector<Spec>& recvs,
                       bool consume_at_once) {
             auto convert = [](const std::vector<Spec>& in) {
               std::vector<esp::MessageSpec> out;
               for (const auto& [ptr, numel, elem_size, dtype, peer] : in) {
                 ESP_CHECK(numel >= 0 && elem_size > 0, "MessageList: bad size ", numel, " x ",
                           elem_size);
                 out.push_back(esp::MessageSpec{ptr, numel, elem_size, dtype, peer});
               }
               return out;
             };
             return esp::MessageList{convert(sends), convert(recvs), consume_at_once};
           }),
           py::arg("sends"), py::arg("recvs"), py::arg("consume_at_once") = false,
           "Messages of one exchange: (ptr, numel, element size, dtype name, peer) each.");
  py::class_<esp::LocalWork, std::shared_ptr<esp::LocalWork>>(m, "LocalWork")
      .def("matched", &esp::LocalWork::matched)
      .def("wait_matched", &esp::LocalWork::wait_matched, py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def("first_unmatched", &esp::LocalWork::first_unmatched)
      .def("wait", &esp::LocalWork::wait, py::arg("stream"))
      .def("synchronize", &esp::LocalWork::synchronize, py::call_guard<py::gil_scoped_release>());
  py::register_exception<esp::MailboxAborted>(m, "MailboxAborted", PyExc_RuntimeError);
  py::class_<esp::LocalMailbox>(m, "LocalMailbox")
      .def(py::init<int, int, std::vector<uintptr_t>>(), py::arg("n"), py::arg("device"),
           py::arg("comm_streams"))
      .def("post", &esp::LocalMailbox::post, py::arg("rank"), py::arg("msgs"), py::arg("stream"),
           py::arg("keep"), py::arg("send_ptrs") = std::vector<std::pair<int, uintptr_t>>{},
           "Post rank's messages; returns its LocalWork. `keep` stays referenced until the "
           "copies using it have completed.")
      .def("abort", &esp::LocalMailbox::abort, py::arg("reason"),
           "Cut off every message still waiting for its peer (its waits raise MailboxAborted) "
           "and refuse later posts; idempotent.")
      .def_property_readonly("aborted", &esp::LocalMailbox::aborted,
                             "The abort's reason, empty while the mailbox is open.");

  // ---- NCCL ----
  py::register_exception<esp::NcclError>(m, "NcclError", PyExc_RuntimeError);
  m.def("nccl_load", &esp::nccl_load, py::arg("library_path"));
  m.def("nccl_is_loaded", &esp::nccl_is_loaded);
  m.def("nccl_version", &esp::nccl_version);
  m.def("nccl_unique_id", [] { return py::bytes(esp::nccl_unique_id()); });

  py::class_<esp::P2POp>(m, "P2POp")
      .def(py::init([](bool is_send, uintptr_t ptr, int64_t nbytes, int peer) {
             return esp::P2POp{is_send, ptr, nbytes, peer};
           }),
           py::arg("is_send"), py::arg("ptr"), py::arg("nbytes"), py::arg("peer"));

  py::class_<esp::NcclComm>(m, "NcclComm")
      // The id arrives as std::string (converted while the GIL is held): a py::bytes parameter
      // would be released after the guard below dropped the GIL.
      .def(py::init([](const std::string& uid, int rank, int world_size, int device,
                       double timeout_s, bool blocking) {
             return new esp::NcclComm(uid, rank, world_size, device, timeout_s, blocking);
           }),
           py::arg("unique_id"), py::arg("rank"), py::arg("world_size"), py::arg("device"),
           py::arg("timeout_s"), py::arg("blocking") = true,
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("rank", &esp::NcclComm::rank)
      .def_property_readonly("size", &esp::NcclComm::size)
      .def_property_readonly("device", &esp::NcclComm::device)
      .def_property_readonly("valid", &esp::NcclComm::valid)
      .def("group_p2p", &esp::NcclComm::group_p2p, py::arg("ops"), py::arg("stream"),
           py::call_guard<py::gil_scoped_release>())
      .def("check", &esp::NcclComm::check)
      .def("wait_event", &esp::NcclComm::wait_event, py::arg("event"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def("abort", &esp::NcclComm::abort, py::call_guard<py::gil_scoped_release>())
      .def("finalize", &esp::NcclComm::finalize, py::call_guard<py::gil_scoped_release>());
}
