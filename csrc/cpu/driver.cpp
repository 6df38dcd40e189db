// The CPU kernels' instruction-set choice, their index tables and the sdd driver (linear.cpp, conv2d.cpp).
#include "driver.h"

#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include "../ops.h"

#include <cstdlib>
#include <string>

namespace sparse_kernels {
namespace cpu {

const Isa& select_isa() {
  static const Isa generic_isa{"generic", generic::dsd, generic::sdd, generic::pack, generic::block_tile,
                               generic::sdd_vector, generic::transpose, generic::norm_moments, generic::norm_silu,
                               generic::norm_silu_grad_sums, generic::norm_silu_grad};
  const char* forced = std::getenv("SPARSE_KERNELS_CPU_ISA");
  const std::string name = forced ? forced : "";
#if SPARSE_KERNELS_X86_ISAS
  static const Isa avx2_isa{"avx2", avx2::dsd, avx2::sdd, avx2::pack, avx2::block_tile, avx2::sdd_vector,
                            avx2::transpose, avx2::norm_moments, avx2::norm_silu, avx2::norm_silu_grad_sums,
                            avx2::norm_silu_grad};
  static const Isa avx512_isa{"avx512", avx512::dsd, avx512::sdd, avx512::pack, avx512::block_tile,
                              avx512::sdd_vector, avx512::transpose, avx512::norm_moments, avx512::norm_silu,
                              avx512::norm_silu_grad_sums, avx512::norm_silu_grad};
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name.empty()) return has_avx512 ? avx512_isa : has_avx2 ? avx2_isa : generic_isa;
  if (name == "avx512") {
    TORCH_CHECK_VALUE(has_avx512, "SPARSE_KERNELS_CPU_ISA=avx512, but this CPU lacks AVX-512F/VL");
    return avx512_isa;
  }
  if (name == "avx2") {
    TORCH_CHECK_VALUE(has_avx2, "SPARSE_KERNELS_CPU_ISA=avx2, but this CPU lacks AVX2/FMA");
    return avx2_isa;
  }
#endif
  TORCH_CHECK_VALUE(name.empty() || name == "generic", "SPARSE_KERNELS_CPU_ISA must be empty, generic",
#if SPARSE_KERNELS_X86_ISAS
                    ", avx2 or avx512",
#endif
                    "; got '", name, "'");
  return generic_isa;
}

std::string selected_isa() { return select_isa().name; }

namespace {

const int32_t* index_data(const at::Tensor& t, const char* op, const char* name, int64_t size) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous() && t.numel() == size, op, ": ", name,
                    " must be a contiguous CPU vector of ", size, " entries, got shape ", t.sizes(), " on ",
                    t.device());
  return t.data_ptr<int32_t>();
}

void check_in_range(const int32_t* v, int64_t size, int64_t bound, const char* op, const char* name) {
  for (int64_t i = 0; i < size; ++i)
    TORCH_CHECK_VALUE(v[i] >= 0 && v[i] < bound, op, ": ", name, "[", i, "] = ", v[i], " is not in [0, ", bound, ")");
}

}  // namespace

PhaseAxis phase_axis(int64_t dst, int64_t src, int64_t kernel, int64_t s, int64_t p, int64_t d) {
  PhaseAxis axis{s, std::vector<int64_t>(s, 0), std::vector<std::vector<std::pair<int64_t, int64_t>>>(s)};
  int64_t lo = 0, hi = src;  // source coordinates read: [lo, hi)
  for (int64_t r = 0; r < s; ++r) {
    axis.count[r] = r < dst ? (dst - r + s - 1) / s : 0;
    if (axis.count[r] == 0) continue;
    for (int64_t i = 0; i < kernel; ++i) {
      const int64_t t = r + p - i * d;
      if ((t % s + s) % s != 0) continue;
      const int64_t a = t / s;  // exact
      axis.taps[r].push_back({i, a});
      lo = std::min(lo, a);
      hi = std::max(hi, axis.count[r] + a);
    }
  }
  axis.before = -lo;
  axis.extent = hi - lo;
  return axis;
}

PairTable make_pairs(const char* op, const at::Tensor& ptr, const at::Tensor& slots, const at::Tensor& other,
                     int64_t other_blocks, PanelLayout layout, int64_t k, int64_t n, const float* packed) {
  const int64_t nnz = slots.numel(), blocks = ptr.numel() - 1, taps = static_cast<int64_t>(layout.group.size());
  TORCH_CHECK_VALUE(blocks >= 0, op, ": the index pointer must not be empty");
  const int32_t* p = index_data(ptr, op, "ptr", blocks + 1);
  const int32_t* s = index_data(slots, op, "slots", nnz);
  const int32_t* o = index_data(other, op, "other index", nnz);
  TORCH_CHECK_VALUE(p[0] == 0 && p[blocks] == nnz, op, ": the index pointer must run from 0 to ", nnz);
  for (int64_t b = 0; b < blocks; ++b)
    TORCH_CHECK_VALUE(p[b] <= p[b + 1], op, ": the index pointer decreases at ", b);
  check_in_range(s, nnz, nnz, op, "slots");
  check_in_range(o, nnz, other_blocks, op, "other index");
  PairTable table;
  table.k = k;
  table.channels = other_blocks * k;
  std::vector<int64_t> position(ceil_div(table.channels, kPanelWidth), -1);
  for (int64_t i = 0; i < nnz; ++i)
    for (int64_t chunk = o[i] * k / kPanelWidth; chunk <= (o[i] * k + k - 1) / kPanelWidth; ++chunk) position[chunk] = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(position.size()); ++j)
    if (position[j] == 0) position[j] = static_cast<int64_t>(table.used.size()), table.used.push_back(j);
  const int64_t weight_taps = layout.weight_taps ? layout.weight_taps : taps;
  table.ptr.resize(blocks + 1);
  table.pairs.reserve(nnz * taps);
  for (int64_t b = 0; b < blocks; ++b) {
    table.ptr[b] = static_cast<int64_t>(table.pairs.size());
    for (int64_t i = p[b]; i < p[b + 1]; ++i)
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t first = o[s[i]] * k, column = position[first / kPanelWidth], lane = first % kPanelWidth;
        const int64_t weight_tap = layout.weight_tap.empty() ? tap : layout.weight_tap[tap];
        table.pairs.push_back({layout.group[tap], (column * layout.rows + layout.shift[tap]) * kPanelWidth + lane,
                               packed + (s[i] * weight_taps + weight_tap) * k * n});
      }
  }
  table.ptr[blocks] = static_cast<int64_t>(table.pairs.size());
  table.layout = std::move(layout);
  return table;
}

void check_slots(const char* op, const at::Tensor& row_idx, const at::Tensor& col_idx, const at::Tensor& order,
                 int64_t rows, int64_t cols) {
  const int64_t nnz = row_idx.numel();
  check_in_range(index_data(row_idx, op, "row_idx", nnz), nnz, rows, op, "row_idx");
  check_in_range(index_data(col_idx, op, "col_idx", nnz), nnz, cols, op, "col_idx");
  const int32_t* o = index_data(order, op, "order", nnz);
  check_in_range(o, nnz, nnz, op, "order");
  std::vector<char> seen(nnz, 0);  // each slot once: threads write disjoint slots
  for (int64_t i = 0; i < nnz; ++i) {
    TORCH_CHECK_VALUE(!seen[o[i]], op, ": order lists slot ", o[i], " twice");
    seen[o[i]] = 1;
  }
}

bool kernels_take(at::ScalarType dtype, int64_t bo, int64_t bi) {
  const bool floating = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  const bool square = bo % 16 == 0 && bi % 16 == 0, vector = bo % 8 == 0 && bi == 1;
  return floating && (square || vector) && bo > 0 && bi > 0;
}

namespace {
// The flat block index row * cols + col of every slot, int64.
at::Tensor flat_blocks(const LayoutShape& shape, const at::Tensor& row_idx, const at::Tensor& col_idx) {
  return row_idx.to(at::kLong).mul(shape.cols).add(col_idx.to(at::kLong));
}
}  // namespace

at::Tensor dense_weight(const at::Tensor& values, const LayoutShape& shape, const at::Tensor& row_idx,
                        const at::Tensor& col_idx) {
  std::vector<int64_t> blocks{shape.rows * shape.cols};
  blocks.insert(blocks.end(), values.sizes().begin() + 1, values.sizes().end());  // bo, bi, *taps
  at::Tensor grid = at::zeros(blocks, values.options()).index_copy_(0, flat_blocks(shape, row_idx, col_idx), values);
  blocks[0] = shape.cols;
  blocks.insert(blocks.begin(), shape.rows);
  std::vector<int64_t> dense{shape.rows * shape.bo, shape.cols * shape.bi};
  dense.insert(dense.end(), values.sizes().begin() + 3, values.sizes().end());
  return grid.view(blocks).transpose(1, 2).reshape(dense);
}

at::Tensor live_blocks(const at::Tensor& dense, const LayoutShape& shape, const at::Tensor& row_idx,
                       const at::Tensor& col_idx) {
  std::vector<int64_t> split{shape.rows, shape.bo, shape.cols, shape.bi};
  split.insert(split.end(), dense.sizes().begin() + 2, dense.sizes().end());
  std::vector<int64_t> flat{shape.rows * shape.cols, shape.bo, shape.bi};
  flat.insert(flat.end(), dense.sizes().begin() + 2, dense.sizes().end());
  return dense.reshape(split).transpose(1, 2).reshape(flat).index_select(0, flat_blocks(shape, row_idx, col_idx));
}

const float* pack_weights(const at::Tensor& values, bool transpose) {
  static thread_local std::vector<float> buffer;
  const int64_t taps = values.dim() - 3;
  std::vector<int64_t> order{0};  // [nnz][taps...][k][n]
  for (int64_t t = 0; t < taps; ++t) order.push_back(3 + t);
  order.push_back(transpose ? 2 : 1);
  order.push_back(transpose ? 1 : 2);
  const at::Tensor source = values.permute(order);
  float* out = grow(buffer, static_cast<size_t>(values.numel()));
  at::from_blob(out, source.sizes(), values.options()).copy_(source);
  return out;
}

void run_sdd(const Isa& isa, const float* dy, int64_t dy_step, const float* a, int64_t a_step, const SddPlan& plan,
             const int32_t* row_idx, const int32_t* col_idx, const int32_t* order, int64_t nnz, int64_t bo,
             int64_t bi, float* acc) {
  const int64_t taps = plan.taps, block = bo * bi;
  if (nnz > 0) std::memset(acc, 0, sizeof(float) * nnz * taps * block);
  at::parallel_for(0, nnz * taps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = 0; chunk < plan.chunks; ++chunk)
      for (int64_t item = begin; item < end; ++item) {
        const int64_t slot = order[item / taps], tap = item % taps, group = chunk * taps + tap;
        const int64_t first = plan.start[group], runs = plan.start[group + 1] - first;
        if (runs == 0) continue;
        isa.sdd({dy + row_idx[slot] * bo, dy_step, a + col_idx[slot] * bi, a_step, plan.runs.data() + first, runs, bo,
                 bi, acc + (slot * taps + tap) * block});
      }
  });
}

}  // namespace cpu
}  // namespace sparse_kernels
