// Host emulation of the few CUDA features kernels/cuda/*.cu use, so the kernels can be run
// on a CPU: the threads of a block are cooperative fibers on ONE OS thread (a 14-instruction
// context switch on x86_64, ucontext elsewhere), blocks run one after another, and
// __syncthreads / warp shuffles are counting barriers at which a fiber yields. Deterministic
// and cheap (no OS threads, no locks); for checking indexing and arithmetic on small shapes.
// See check.cpp.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

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
inline Dim threadIdx;  // set by the scheduler before it resumes a fiber
inline Dim blockIdx;   // one block at a time
inline Dim gridDim, blockDim;

// ---------------------------------------------------------------- fibers
#if defined(__x86_64__)
// keel_fiber_switch(save, to): pushes the callee-saved registers, stores the stack pointer
// in *save, loads `to` and pops the registers saved there (System V ABI).
extern "C" void keel_fiber_switch(void** save, void* to);
asm(R"(
  .text
  .globl keel_fiber_switch
  .type keel_fiber_switch, @function
keel_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size keel_fiber_switch, .-keel_fiber_switch
)");
#endif

struct Fibers {
  static constexpr size_t kStack = 64 * 1024;
  std::vector<std::vector<unsigned char>> stacks;
  std::vector<char> done;
#if defined(__x86_64__)
  std::vector<void*> sp;
  void* sched_sp = nullptr;
#else
  std::vector<ucontext_t> ctx;
  ucontext_t sched;
#endif
  const std::function<void()>* kernel = nullptr;
  unsigned current = 0;
};
inline Fibers g_fibers;

inline void fiber_yield() {
#if defined(__x86_64__)
  keel_fiber_switch(&g_fibers.sp[g_fibers.current], g_fibers.sched_sp);
#else
  swapcontext(&g_fibers.ctx[g_fibers.current], &g_fibers.sched);
#endif
}

[[noreturn]] inline void fiber_entry() {
  (*g_fibers.kernel)();
  g_fibers.done[g_fibers.current] = 1;
  fiber_yield();  // never resumed
  std::abort();
}

inline void fiber_start(unsigned t) {
  unsigned char* base = g_fibers.stacks[t].data();
#if defined(__x86_64__)
  // Stack top (16-byte aligned): [top - 8] fake return address, [top - 16] fiber_entry, then
  // six zeroed registers; after the pops and `ret`, rsp = top - 8 as after a call.
  uintptr_t top = ((uintptr_t)(base + Fibers::kStack)) & ~(uintptr_t)15;
  void** s = (void**)top;
  s[-1] = nullptr;
  s[-2] = (void*)&fiber_entry;
  for (int i = 3; i <= 8; ++i) s[-i] = nullptr;
  g_fibers.sp[t] = (void*)(s - 8);
#else
  ucontext_t& c = g_fibers.ctx[t];
  getcontext(&c);
  c.uc_stack.ss_sp = base;
  c.uc_stack.ss_size = Fibers::kStack;
  c.uc_link = nullptr;
  makecontext(&c, (void (*)())fiber_entry, 0);
#endif
}

inline void fiber_resume(unsigned t) {
  g_fibers.current = t;
  threadIdx = {t, 1, 1};
#if defined(__x86_64__)
  keel_fiber_switch(&g_fibers.sched_sp, g_fibers.sp[t]);
#else
  swapcontext(&g_fibers.sched, &g_fibers.ctx[t]);
#endif
}

// ---------------------------------------------------------------- barriers
// A counting barrier of `n` fibers: the last to arrive opens it, the others yield until then.
struct FiberBarrier {
  unsigned count = 0, gen = 0;
  void wait(unsigned n) {
    const unsigned g = gen;
    if (++count == n) {
      count = 0;
      ++gen;
      return;
    }
    while (gen == g) fiber_yield();
  }
};
inline FiberBarrier g_block_barrier;
inline FiberBarrier g_warp_barrier[32];
inline float g_warp_slots[32][32];

inline void __syncthreads() { g_block_barrier.wait(blockDim.x); }

inline float __shfl_down_sync(unsigned, float v, int o) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  g_warp_slots[warp][lane] = v;
  g_warp_barrier[warp].wait(32);
  const float r = lane + o < 32 ? g_warp_slots[warp][lane + o] : v;
  g_warp_barrier[warp].wait(32);
  return r;
}

inline float __expf(float x) { return std::exp(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline void __stcs(uint4* p, uint4 v) { *p = v; }
using std::min;
using std::max;

// Runs `kernel` on grid x block threads (block a multiple of 32, at most 1024).
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
  if (block % 32 != 0 || block > 1024) {
    std::fprintf(stderr, "launch: block size %u must be a multiple of 32, at most 1024\n", block);
    std::abort();
  }
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  Fibers& f = g_fibers;
  if (f.stacks.size() < block) f.stacks.resize(block, std::vector<unsigned char>(Fibers::kStack));
  f.done.assign(block, 0);
#if defined(__x86_64__)
  f.sp.resize(block);
#else
  f.ctx.resize(block);
#endif
  f.kernel = &kernel;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {b, 1, 1};
    g_block_barrier = {};
    for (auto& w : g_warp_barrier) w = {};
    std::fill(f.done.begin(), f.done.end(), 0);
    for (unsigned t = 0; t < block; ++t) fiber_start(t);
    for (unsigned alive = block; alive > 0;) {
      alive = 0;
      for (unsigned t = 0; t < block; ++t)
        if (!f.done[t]) {
          fiber_resume(t);
          alive += !f.done[t];
        }
    }
  }
}
