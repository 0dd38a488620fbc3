// keel utility kernels shared by every op: buffer fills (the output-poisoning test hook).
// Host side: kernels/src/cuda/mod.rs (`poison`). One parameter struct per kernel, mirrored
// by a #[repr(C)] struct there; the static_assert and the Rust const assert pin its layout.
#include <stddef.h>

typedef long long i64;

struct FillU8Params {
  unsigned char* p;    // n bytes
  i64 n;
  unsigned int value;  // the byte, in the low 8 bits
  unsigned int pad;    // explicit tail padding (0)
};

static_assert(sizeof(FillU8Params) == 24 && offsetof(FillU8Params, n) == 8 && offsetof(FillU8Params, value) == 16,
              "FillU8Params layout; keep in sync with kernels/src/cuda/mod.rs");

// Fills bytes [0, n) of p with `value` (0xFF poisons f32/f16/bf16 with NaN); grid-stride loop.
extern "C" __global__ void fill_u8(const FillU8Params a) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += (i64)gridDim.x * blockDim.x)
    a.p[i] = (unsigned char)a.value;
}
