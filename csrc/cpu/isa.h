// The plain interface between the CPU kernels' drivers (kernels.cpp) and their vectorised
// inner loops (microkernels.h), compiled once per instruction set.
#pragma once

#include <cstdint>

namespace sparse_kernels {
namespace cpu {

// One live block (and tap) feeding a block of outputs: its columns start at a + a_offset
// and its packed weights w are [k][n], row-major.
struct DsdPair {
  int64_t a_offset;
  const float* w;
};

// out[m, 0:n] = bias[0:n] + sum over pairs p, kk < k of a[m, p.a_offset + kk] * p.w[kk, :]
// for m < rows (rows m up to the next multiple of the ISA's rows_per_tile must be
// readable in a); n is a multiple of 16. Rows are lda and ldo floats apart.
struct DsdRows {
  const float* a;
  int64_t lda, rows;
  const DsdPair* pairs;
  int64_t npairs, k, n;
  const float* bias;  // nullptr: zero
  float* out;
  int64_t ldo;
};

// acc[0:bo, 0:bi] += dy[0:rows, 0:bo].T @ a[0:rows, 0:bi]; bo and bi are multiples of 16,
// acc is contiguous [bo][bi].
struct SddBlock {
  const float* dy;
  int64_t lddy;
  const float* a;
  int64_t lda, rows, bo, bi;
  float* acc;
};

struct Isa {
  const char* name;
  int64_t rows_per_tile;
  void (*dsd)(const DsdRows&);
  void (*sdd)(const SddBlock&);
};

#define SPARSE_KERNELS_DECLARE_ISA(NAME) \
  namespace NAME {                       \
  extern const int64_t rows_per_tile;    \
  void dsd(const DsdRows&);              \
  void sdd(const SddBlock&);             \
  }

SPARSE_KERNELS_DECLARE_ISA(generic)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSE_KERNELS_X86_ISAS 1
SPARSE_KERNELS_DECLARE_ISA(avx2)
SPARSE_KERNELS_DECLARE_ISA(avx512)
#endif

}  // namespace cpu
}  // namespace sparse_kernels
