// The CPU kernels' inner loops for AVX-512F: 32 vector registers of 16 floats.
#include <cstdint>

#include "isa.h"

#if SPARSE_KERNELS_X86_ISAS
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#define SK_ISA avx512
#define SK_VW 16
#define SK_MR 12
#define SK_MO 8
#define SK_REGISTERS 32
#include "microkernels.h"

namespace sparse_kernels {
namespace cpu {
namespace avx512 {
extern const int64_t rows_per_tile = SK_MR;
}  // namespace avx512
}  // namespace cpu
}  // namespace sparse_kernels
#endif
