// liteattn_ops._C: raw device pointers in, kernel launched on the given stream.
// Does not link torch; liteattn_ops/ops.py owns tensors, checks and allocation.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>
#include <tuple>

#include "liteattn.h"
#include "liteattn_kernels.h"  // generated: LITEATTN_INT8

namespace py = pybind11;
using Stride3 = std::tuple<int64_t, int64_t, int64_t>;

namespace {

liteattn::DType parse_dtype(const std::string& dtype) {
  if (dtype == "bfloat16") return liteattn::DType::kBFloat16;
  if (dtype == "float16") return liteattn::DType::kFloat16;
  throw std::invalid_argument("liteattn._C: dtype must be 'bfloat16' or 'float16', got '" + dtype + "'");
}

std::array<int64_t, 3> to_array(const Stride3& s) { return {std::get<0>(s), std::get<1>(s), std::get<2>(s)}; }

template <class T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "liteattn sm_90a forward attention kernel (TMA + wgmma) with the temporal skip state";

  m.def(
      "forward",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, int batch, int heads, int seqlen_q,
         int seqlen_k, int head_dim, const std::string& dtype, Stride3 q_stride, Stride3 k_stride, Stride3 v_stride,
         Stride3 out_stride, float scale, uintptr_t state, uintptr_t threshold, uintptr_t must_do, int num_must_do,
         uintptr_t must_skip, int num_must_skip, uintptr_t stream, uintptr_t schedule, bool int8, uintptr_t q_scale,
         uintptr_t k_scale, uintptr_t q_mu, uintptr_t work_counter, uintptr_t split_workspace,
         int64_t split_workspace_size, uintptr_t timeline, int timeline_ctas, int timeline_rows) {
        liteattn::FwdArgs a;
        a.q = as_ptr<const void>(q);
        a.k = as_ptr<const void>(k);
        a.v = as_ptr<const void>(v);
        a.out = as_ptr<void>(out);
        a.lse = as_ptr<float>(lse);
        a.batch = batch;
        a.heads = heads;
        a.seqlen_q = seqlen_q;
        a.seqlen_k = seqlen_k;
        a.head_dim = head_dim;
        a.dtype = parse_dtype(dtype);
        a.q_stride = to_array(q_stride);
        a.k_stride = to_array(k_stride);
        a.v_stride = to_array(v_stride);
        a.out_stride = to_array(out_stride);
        a.scale = scale;
        a.state = as_ptr<int32_t>(state);
        a.threshold = as_ptr<const float>(threshold);
        a.must_do = as_ptr<const int32_t>(must_do);
        a.num_must_do = num_must_do;
        a.must_skip = as_ptr<const int32_t>(must_skip);
        a.num_must_skip = num_must_skip;
        a.stream = as_ptr<void>(stream);
        a.schedule = as_ptr<int32_t>(schedule);
        a.work_counter = as_ptr<int32_t>(work_counter);
        a.int8 = int8;
        a.q_scale = as_ptr<const float>(q_scale);
        a.k_scale = as_ptr<const float>(k_scale);
        a.q_mu = as_ptr<const float>(q_mu);
        a.split_workspace = as_ptr<float>(split_workspace);
        a.split_workspace_size = split_workspace_size;
        a.timeline = as_ptr<uint64_t>(timeline);
        a.timeline_ctas = timeline_ctas;
        a.timeline_rows = timeline_rows;
        py::gil_scoped_release release;
        liteattn::forward(a);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("batch"), py::arg("heads"),
      py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("head_dim"), py::arg("dtype"), py::arg("q_stride"),
      py::arg("k_stride"), py::arg("v_stride"), py::arg("out_stride"), py::arg("scale"), py::arg("state"),
      py::arg("threshold"), py::arg("must_do"), py::arg("num_must_do"), py::arg("must_skip"),
      py::arg("num_must_skip"), py::arg("stream"), py::arg("schedule") = uintptr_t(0), py::arg("int8") = false,
      py::arg("q_scale") = uintptr_t(0), py::arg("k_scale") = uintptr_t(0), py::arg("q_mu") = uintptr_t(0),
      py::arg("work_counter") = uintptr_t(0), py::arg("split_workspace") = uintptr_t(0),
      py::arg("split_workspace_size") = int64_t(0), py::arg("timeline") = uintptr_t(0), py::arg("timeline_ctas") = 0,
      py::arg("timeline_rows") = 0,
      "Forward attention. state == 0 runs the dense path; otherwise the skip state (B, H, Mt, W) int32 is read "
      "and updated in place. schedule (skip path, optional): B*H*Mt int32 of device scratch for the "
      "heaviest-first query-tile order; 0 runs the query tiles in natural order. work_counter (skip path, optional): "
      "one int32 of device scratch, the persistent skip kernel's shared count of the rows handed out (zeroed by the "
      "call); 0: each CTA takes every G-th row. split_workspace (optional): float32 device scratch of "
      "split_workspace_size floats (dense_split_workspace_floats, or skip_split_workspace_floats with a state) for "
      "the split wave tail; 0: the tail is not split. "
      "int8=True: INT8 Q/K mode, q and k "
      "are the int8 (B, H, S, D) buffers of quantize_qk (strides in bytes), q_scale / k_scale / q_mu its float32 "
      "outputs, dtype that of v and out. timeline (optional, a kernel with the timeline variant only): uint64 "
      "(timeline_ctas, TIMELINE_HEADER + TIMELINE_MARKS * timeline_rows) of per-CTA %globaltimer marks "
      "(tools/cta_timeline.py). Raises ValueError on bad arguments.");

#if LITEATTN_INT8
  m.def(
      "quantize_qk",
      [](uintptr_t q, uintptr_t k, int batch, int heads, int seqlen_q, int seqlen_k, int head_dim,
         const std::string& dtype, Stride3 q_stride, Stride3 k_stride, uintptr_t q8, uintptr_t k8, uintptr_t q_scale,
         uintptr_t k_scale, uintptr_t k_mean, uintptr_t q_mu, uintptr_t partial, uintptr_t stream) {
        liteattn::QuantArgs a;
        a.q = as_ptr<const void>(q);
        a.k = as_ptr<const void>(k);
        a.batch = batch;
        a.heads = heads;
        a.seqlen_q = seqlen_q;
        a.seqlen_k = seqlen_k;
        a.head_dim = head_dim;
        a.dtype = parse_dtype(dtype);
        a.q_stride = to_array(q_stride);
        a.k_stride = to_array(k_stride);
        a.q8 = as_ptr<int8_t>(q8);
        a.k8 = as_ptr<int8_t>(k8);
        a.q_scale = as_ptr<float>(q_scale);
        a.k_scale = as_ptr<float>(k_scale);
        a.k_mean = as_ptr<float>(k_mean);
        a.q_mu = as_ptr<float>(q_mu);
        a.partial = as_ptr<float>(partial);
        a.stream = as_ptr<void>(stream);
        py::gil_scoped_release release;
        liteattn::quantize_qk(a);
      },
      py::arg("q"), py::arg("k"), py::arg("batch"), py::arg("heads"), py::arg("seqlen_q"), py::arg("seqlen_k"),
      py::arg("head_dim"), py::arg("dtype"), py::arg("q_stride"), py::arg("k_stride"), py::arg("q8"), py::arg("k8"),
      py::arg("q_scale"), py::arg("k_scale"), py::arg("k_mean"), py::arg("q_mu"), py::arg("partial"), py::arg("stream"),
      "INT8 Q/K pre-pass (out/INT8_SPEC.md steps 1-2) on `stream`: k's smoothing mean into k_mean (B, H, D) "
      "float32, q per BM-row block and k - mean per BN-row block into int8 q8 / k8 (B, H, S, D) contiguous with "
      "float32 scales q_scale (B, H, Mt) and k_scale (B, H, Nt), and q . mean per query row into q_mu (B, H, S_q) "
      "float32 (the kernel's LSE correction). partial: device scratch of "
      "B * H * INT8_MEAN_MAX_SPLITS * head_dim float32. Raises ValueError on bad arguments.");
  m.attr("INT8_MEAN_MAX_SPLITS") = liteattn::kInt8MeanMaxSplits;
#endif
  m.attr("HAS_INT8") = bool(LITEATTN_INT8);

  m.def(
      "tile_shape",
      [](int head_dim, const std::string& dtype) {
        const auto t = liteattn::tile_shape(head_dim, parse_dtype(dtype));
        if (t.bm == 0) throw std::invalid_argument("liteattn._C.tile_shape: no kernel for head_dim " + std::to_string(head_dim));
        return std::make_tuple(t.bm, t.bn);
      },
      py::arg("head_dim"), py::arg("dtype"), "(BM, BN) of the kernel for this head dim and dtype.");

  m.def(
      "tma_compatible",
      [](uintptr_t ptr, Stride3 stride, Stride3 sizes) {
        return liteattn::tma_compatible(ptr, to_array(stride), to_array(sizes), 2);
      },
      py::arg("ptr"), py::arg("stride"), py::arg("sizes") = Stride3{2, 2, 2},
      "True when a 16-bit (b, h, s, d) view at ptr with element strides `stride` over (b, h, s) and sizes `sizes` "
      "can be loaded by TMA without a copy: 16-byte aligned base, strides positive multiples of 8 elements "
      "(size-1 dims exempt).");

  m.attr("MAX_STATE_WORDS") = liteattn::kMaxStateWords;
  m.attr("TIMELINE_HEADER") = liteattn::kTimelineHeader;
  m.attr("TIMELINE_MARKS") = liteattn::kTimelineMarks;
  // The scratch one call's split wave tail needs, on the current device (0: not split: no such variant, or no tail
  // worth splitting); both take (batch, heads, seqlen_q, seqlen_k, head_dim, dtype, int8=False).
  auto def_split_workspace = [&m](const char* name, auto floats, const char* doc) {
    m.def(
        name,
        [floats](int batch, int heads, int seqlen_q, int seqlen_k, int head_dim, const std::string& dtype, bool int8) {
          return floats(batch, heads, seqlen_q, seqlen_k, head_dim, parse_dtype(dtype), int8);
        },
        py::arg("batch"), py::arg("heads"), py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("head_dim"),
        py::arg("dtype"), py::arg("int8") = false, doc);
  };
  def_split_workspace("dense_split_workspace_floats", liteattn::dense_split_workspace_floats,
                      "float32 scratch the dense call of this shape needs for its split wave tail on the current "
                      "device (0: the tail is not split: no split_tail variant, or no tail worth splitting).");
  def_split_workspace("skip_split_workspace_floats", liteattn::skip_split_workspace_floats,
                      "float32 scratch the skip-path call of this shape needs for its split wave tail (partial O and "
                      "LSE, and the tail rows' tile maxima for the deferred votes) on the current device (0: not "
                      "split: no split_skip variant, or no tail worth splitting).");
  m.def(
      "split_tail_plan",
      [](int64_t tiles, int sms, int num_n_tiles) {
        const liteattn::SplitTailPlan plan = liteattn::split_tail_plan(tiles, sms, num_n_tiles);
        return py::make_tuple(plan.chunks, plan.whole, plan.units, plan.grid);
      },
      py::arg("tiles"), py::arg("sms"), py::arg("num_n_tiles"),
      "The dense path's wave-tail split for `tiles` query tiles on `sms` SMs: (chunks, whole, units, grid); "
      "chunks < 2: no split.");
  m.def("device_sm_count", &liteattn::device_sm_count, "The current CUDA device's SM count.");
  m.def(
      "schedule_scope",
      [](int batch, int heads, int num_m_tiles, int seqlen_k, int head_dim) {
        switch (liteattn::schedule_scope(batch, heads, num_m_tiles, seqlen_k, head_dim)) {
          case liteattn::ScheduleScope::kGlobal: return std::string("global");
          case liteattn::ScheduleScope::kPerHead: return std::string("head");
          default: return std::string("none");
        }
      },
      py::arg("batch"), py::arg("heads"), py::arg("num_m_tiles"), py::arg("seqlen_k"), py::arg("head_dim"),
      "Scope of the skip path's heaviest-first query-tile order: 'global', 'head' or 'none' (natural order).");
}
