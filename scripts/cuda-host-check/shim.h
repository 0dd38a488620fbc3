// Host emulation of the few CUDA features kernels/cuda/*.cu use, so the kernels can be run
// on a CPU (one std::thread per CUDA thread, blocks one after another). Slow; for checking
// indexing and arithmetic on small shapes only. See check.cpp.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(x)
// Blocks run one at a time, so a function-local static is per-block shared memory.
#undef __shared__
#define __shared__ static

struct Dim { unsigned x = 1, y = 1, z = 1; };
inline thread_local Dim threadIdx;
inline Dim blockIdx;   // one block at a time
inline Dim gridDim, blockDim;

inline std::barrier<>* g_block_barrier = nullptr;
inline std::barrier<>* g_warp_barrier[32];
inline float g_warp_slots[32][32];

inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }

inline float __shfl_down_sync(unsigned, float v, int o) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  g_warp_slots[warp][lane] = v;
  g_warp_barrier[warp]->arrive_and_wait();
  const float r = lane + o < 32 ? g_warp_slots[warp][lane + o] : v;
  g_warp_barrier[warp]->arrive_and_wait();
  return r;
}

inline float __expf(float x) { return std::exp(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline void __stcs(uint4* p, uint4 v) { *p = v; }
using std::min;
using std::max;

// Runs `kernel` on grid x block threads.
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  std::barrier<> bb(block);
  std::vector<std::barrier<>*> wb;
  for (unsigned w = 0; w < (block + 31) / 32; ++w) wb.push_back(new std::barrier<>(32));
  g_block_barrier = &bb;
  for (unsigned w = 0; w < wb.size(); ++w) g_warp_barrier[w] = wb[w];
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {b, 1, 1};
    std::vector<std::thread> ts;
    ts.reserve(block);
    for (unsigned t = 0; t < block; ++t)
      ts.emplace_back([t, &kernel] { threadIdx = {t, 1, 1}; kernel(); });
    for (auto& th : ts) th.join();
  }
  for (auto* w : wb) delete w;
}
