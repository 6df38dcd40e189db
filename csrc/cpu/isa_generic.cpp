// The CPU kernels' inner loops for the baseline instruction set of the build (SSE2 on x86-64, NEON on arm64).
#include <cstdint>

#include "isa.h"



#define SK_ISA generic
#define SK_VW 4
#define SK_ACC 12
#include "microkernels.h"
#include "microkernels_vector.h"
#include "microkernels_norm.h"

