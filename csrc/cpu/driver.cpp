// The CPU kernels' instruction-set choice and the checks and tables shared by linear.cpp and conv.cpp.
#include "driver.h"

#include "../ops.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace sparse_kernels {
namespace cpu {

const Isa& select_isa() {
  static const Isa generic_isa{"generic", generic::rows_per_tile, generic::dsd, generic::sdd};
  const char* forced = std::getenv("SPARSE_KERNELS_CPU_ISA");
  const std::string name = forced ? forced : "";
#if SPARSE_KERNELS_X86_ISAS
  static const Isa avx2_isa{"avx2", avx2::rows_per_tile, avx2::dsd, avx2::sdd};
  static const Isa avx512_isa{"avx512", avx512::rows_per_tile, avx512::dsd, avx512::sdd};
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

void check_float(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

at::Tensor checked_bias(const std::optional<at::Tensor>& bias, const char* op, int64_t features) {
  if (!bias) return at::Tensor();
  at::Tensor b = bias->contiguous();
  check_float(b, op, "bias", 1);
  TORCH_CHECK_VALUE(b.size(0) == features, op, ": bias must have ", features, " entries, got ", b.sizes());
  return b;
}

void check_block(const char* op, int64_t bo, int64_t bi) {
  TORCH_CHECK_VALUE(bo > 0 && bi > 0 && bo % 16 == 0 && bi % 16 == 0, op, ": block (", bo, ", ", bi,
                    ") must have sides that are multiples of 16");
}

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

PairTable make_pairs(const char* op, const at::Tensor& ptr, const at::Tensor& slots, const at::Tensor& other,
                     int64_t other_blocks, int64_t taps, int64_t tap_stride, int64_t k, int64_t n,
                     const at::Tensor& values, const float* packed) {
  const int64_t nnz = slots.numel(), blocks = ptr.numel() - 1;
  TORCH_CHECK_VALUE(values.size(0) == nnz, op, ": the index lists ", nnz, " blocks but values of shape ",
                    values.sizes(), " holds ", values.size(0));
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
  table.ptr.resize(blocks + 1);
  table.pairs.reserve(nnz * taps);
  for (int64_t b = 0; b < blocks; ++b) {
    table.ptr[b] = static_cast<int64_t>(table.pairs.size());
    for (int64_t i = p[b]; i < p[b + 1]; ++i)
      for (int64_t tap = 0; tap < taps; ++tap)
        table.pairs.push_back({tap * tap_stride + o[s[i]] * k, packed + (s[i] * taps + tap) * k * n});
  }
  table.ptr[blocks] = static_cast<int64_t>(table.pairs.size());
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

}  // namespace cpu
}  // namespace sparse_kernels
