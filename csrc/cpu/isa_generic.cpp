// The CPU kernels' inner loops for the baseline instruction set of the build (SSE2 on x86-64, NEON on arm64).
#include <cstdint>

#include "isa.h"



#define SK_ISA generic
#define SK_VW 4
#define SK_MR 6
#define SK_MO 4
#define SK_REGISTERS 16
#include "microkernels.h"

namespace sparse_kernels {
namespace cpu {
namespace generic {
extern const int64_t rows_per_tile = SK_MR;
}  // namespace generic
}  // namespace cpu
}  // namespace sparse_kernels

