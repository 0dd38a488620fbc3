// keel GroupNorm (+ optional SiLU) forward and backward, built for small batches.
//
// x is contiguous (N, C, HW); G groups of Cg = C / G channels; a group (n, g) is the
// contiguous range [(n * C + g * Cg) * HW, +Cg * HW). Statistics and accumulation in f32.
//
// Work split (the host side is kernels/src/cuda/group_norm.rs):
// - "stats" blocks: each (sample, group) range of L = Cg * HW elements is cut into S
//   chunks of `chunk` elements, one block per chunk (grid N * G * S), so a batch of 1-16
//   still fills the GPU. Each block writes one Welford partial (count, mean, M2); the
//   consumers merge the S partials of their group with Chan's formula (robust for a mean
//   of 1e3 and a std of 1; no E[x^2] - E[x]^2 cancellation).
// - "row" blocks: each (n, c) row of HW elements is cut into RS chunks of `rchunk`
//   elements (grid N * C * RS); per-channel constants (w, b, mean, rstd) are per block.
// - Loads/stores are 16 bytes wide (4 x f32, 8 x f16/bf16) between a scalar head (up to
//   the first 16-byte boundary) and a scalar tail; when the pointers of a row kernel do
//   not share the same alignment, the row runs scalar. Any length, any offset is right.
//
// Forward  = gn_stats + gn_fwd_apply (y = (x - mean) * rstd * w + b, then SiLU).
// Backward = gn_stats (recomputed) + gn_bwd_reduce (per-row A = sum g * xhat, B = sum g,
//            g = dy * silu'(z) or dy) + gn_bwd_finalize (per group m1 = sum_c w_c B / L,
//            m2 = sum_c w_c A / L; dweight = sum_n A, dbias = sum_n B) + gn_bwd_dx
//            (dx = rstd * (w * g - m1 - xhat * m2)). Nothing x-sized but dx is written.
// L2 reuse: gn_fwd_apply and gn_bwd_reduce walk the grid and each chunk in reverse order,
// so they start on the data the previous kernel read last (still in the 50 MB L2 of an
// H100); gn_bwd_dx walks forward, where gn_bwd_reduce ended. Outputs use streaming stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

#define GN_THREADS 256
#define GN_WARPS (GN_THREADS / 32)
#define GN_UNROLL 4

typedef long long i64;

// ---------------------------------------------------------------- dtype helpers
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16 bytes of T.
template <typename T> struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T> __device__ __forceinline__ void load_pack(const T* p, float* f) {
  Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
  for (int i = 0; i < Pack<T>::N; ++i) f[i] = to_f(pk.v[i]);
}

template <typename T> __device__ __forceinline__ void store_pack(T* p, const float* f) {
  Pack<T> pk;
#pragma unroll
  for (int i = 0; i < Pack<T>::N; ++i) pk.v[i] = from_f<T>(f[i]);
  // Streaming store: the output is not read again by this op, keep x in L2 instead.
  __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&pk));
}

// Number of scalar elements before the first 16-byte aligned element of p (< 16/sizeof(T)).
template <typename T> __device__ __forceinline__ i64 head_len(const void* p, i64 len) {
  i64 h = (i64)(((uintptr_t)16 - ((uintptr_t)p & 15)) & 15) / (i64)sizeof(T);
  return h < len ? h : len;
}

// ---------------------------------------------------------------- reductions
// Chan et al. merge of (nb, mb, qb) into (n, m, q); q is the sum of squared deviations.
__device__ __forceinline__ void wf_merge(float& n, float& m, float& q, float nb, float mb, float qb) {
  if (nb == 0.f) return;
  const float nn = n + nb;
  const float delta = mb - m;
  const float f = nb / nn;
  m = fmaf(delta, f, m);
  q = q + qb + delta * delta * n * f;
  n = nn;
}

// Merge of K values (one 16-byte pack or fewer) as a single Welford element.
template <int K> __device__ __forceinline__ void wf_add_vec(float& n, float& m, float& q, const float* v) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) s += v[i];
  const float vm = s * (1.f / K);
  float vq = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const float d = v[i] - vm;
    vq = fmaf(d, d, vq);
  }
  wf_merge(n, m, q, (float)K, vm, vq);
}

__device__ __forceinline__ void wf_warp(float& n, float& m, float& q) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float nb = __shfl_down_sync(0xffffffffu, n, o);
    const float mb = __shfl_down_sync(0xffffffffu, m, o);
    const float qb = __shfl_down_sync(0xffffffffu, q, o);
    wf_merge(n, m, q, nb, mb, qb);
  }
}

// Block-wide Welford; the result is valid in thread 0.
__device__ __forceinline__ void wf_block(float& n, float& m, float& q) {
  __shared__ float sn[GN_WARPS], sm[GN_WARPS], sq[GN_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  wf_warp(n, m, q);
  if (lane == 0) { sn[warp] = n; sm[warp] = m; sq[warp] = q; }
  __syncthreads();
  if (warp == 0) {
    n = lane < GN_WARPS ? sn[lane] : 0.f;
    m = lane < GN_WARPS ? sm[lane] : 0.f;
    q = lane < GN_WARPS ? sq[lane] : 0.f;
    wf_warp(n, m, q);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum of two values; the result is valid in thread 0.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float sa[GN_WARPS], sb[GN_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) { sa[warp] = a; sb[warp] = b; }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < GN_WARPS ? sa[lane] : 0.f);
    b = warp_sum(lane < GN_WARPS ? sb[lane] : 0.f);
  }
}

// Merges the S stats partials of group ng (deterministic order, so every block of a group
// gets bit-identical statistics) and leaves mean and rstd in shared memory for the block.
__device__ __forceinline__ void group_stats(const float* __restrict__ part, i64 ng, int S, float eps,
                                            float& mean, float& rstd) {
  __shared__ float s_mean, s_rstd;
  if (threadIdx.x < 32) {
    float n = 0.f, m = 0.f, q = 0.f;
    const float* p = part + ng * (i64)S * 3;
    for (int i = threadIdx.x; i < S; i += 32) wf_merge(n, m, q, p[3 * i], p[3 * i + 1], p[3 * i + 2]);
    wf_warp(n, m, q);
    if (threadIdx.x == 0) {
      // Biased variance like PyTorch; a constant group gives rstd = 1/sqrt(eps).
      const float var = fmaxf(q / n, 0.f);
      s_mean = m;
      s_rstd = rsqrtf(var + eps);
      if (q != q) s_rstd = q;  // keep NaN (fmaxf would drop it)
    }
  }
  __syncthreads();
  mean = s_mean;
  rstd = s_rstd;
}

__device__ __forceinline__ float sigmoidf_(float z) { return __frcp_rn(1.f + __expf(-z)); }

// ---------------------------------------------------------------- kernels
// Stats partials. Grid: N * G * S blocks; block b handles chunk s = b % S of group b / S.
// part[(ng * S + s) * 3 + {0, 1, 2}] = (count, mean, M2) of that chunk.
template <typename T>
__device__ void gn_stats(const T* __restrict__ x, float* __restrict__ part, i64 L, i64 chunk, int S) {
  constexpr int V = Pack<T>::N;
  const i64 bid = blockIdx.x;
  const i64 ng = bid / S;
  const i64 s = bid % S;
  const i64 start = s * chunk;
  const i64 len = min(chunk, L - start);
  const T* p = x + ng * L + start;

  float n = 0.f, m = 0.f, q = 0.f;
  const i64 head = head_len<T>(p, len);
  const i64 nvec = (len - head) / V;
  const i64 tail0 = head + nvec * V;
  const int t = threadIdx.x;
  if (t < head) { const float v = to_f(p[t]); wf_merge(n, m, q, 1.f, v, 0.f); }
  const T* pv = p + head;
  i64 i = t;
  for (; i + (GN_UNROLL - 1) * GN_THREADS < nvec; i += GN_UNROLL * GN_THREADS) {
    float v[GN_UNROLL][V];
#pragma unroll
    for (int u = 0; u < GN_UNROLL; ++u) load_pack<T>(pv + (i + u * GN_THREADS) * V, v[u]);
#pragma unroll
    for (int u = 0; u < GN_UNROLL; ++u) wf_add_vec<V>(n, m, q, v[u]);
  }
  for (; i < nvec; i += GN_THREADS) {
    float v[V];
    load_pack<T>(pv + i * V, v);
    wf_add_vec<V>(n, m, q, v);
  }
  if (tail0 + t < len) { const float v = to_f(p[tail0 + t]); wf_merge(n, m, q, 1.f, v, 0.f); }

  wf_block(n, m, q);
  if (t == 0) {
    float* o = part + bid * 3;
    o[0] = n;
    o[1] = m;
    o[2] = q;
  }
}

// Decodes a row block: row r = (n, c), chunk s; `reverse` walks the grid backwards.
struct RowBlock {
  i64 row, ng, start, len;
  int c;
};

__device__ __forceinline__ RowBlock row_block(bool reverse, int C, int G, i64 HW, i64 rchunk, int RS) {
  const i64 b = reverse ? (i64)gridDim.x - 1 - (i64)blockIdx.x : (i64)blockIdx.x;
  RowBlock rb;
  rb.row = b / RS;
  const i64 s = b % RS;
  const i64 n = rb.row / C;
  rb.c = (int)(rb.row % C);
  rb.ng = n * G + rb.c / (C / G);
  rb.start = s * rchunk;
  rb.len = min(rchunk, HW - rb.start);
  return rb;
}

// y = (x - mean) * (rstd * w) + b, optionally SiLU. Grid: N * C * RS blocks.
template <typename T>
__device__ void gn_fwd_apply(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                             T* __restrict__ y, const float* __restrict__ part, int C, int G, i64 HW,
                             i64 rchunk, int RS, int S, float eps, int silu) {
  constexpr int V = Pack<T>::N;
  const RowBlock rb = row_block(true, C, G, HW, rchunk, RS);
  float mean, rstd;
  group_stats(part, rb.ng, S, eps, mean, rstd);
  const float scale = rstd * to_f(w[rb.c]);
  const float shift = to_f(bias[rb.c]);
  const i64 off = rb.row * HW + rb.start;
  const T* px = x + off;
  T* py = y + off;
  const i64 len = rb.len;
  auto f = [&](float v) {
    const float z = fmaf(v - mean, scale, shift);
    return silu ? z * sigmoidf_(z) : z;
  };
  const bool vec_ok = (((uintptr_t)px ^ (uintptr_t)py) & 15) == 0;
  const i64 head = vec_ok ? head_len<T>(px, len) : len;
  const i64 nvec = (len - head) / V;
  const i64 tail0 = head + nvec * V;
  const int t = threadIdx.x;
  for (i64 i = t; i < head; i += GN_THREADS) py[i] = from_f<T>(f(to_f(px[i])));
  const T* xv = px + head;
  T* yv = py + head;
  i64 i = t;
  // Vectors are visited last to first (j = nvec - 1 - i): gn_stats walked its chunk first
  // to last, so the end of each chunk is what is still in L2.
  for (; i + (GN_UNROLL - 1) * GN_THREADS < nvec; i += GN_UNROLL * GN_THREADS) {
    float v[GN_UNROLL][V];
#pragma unroll
    for (int u = 0; u < GN_UNROLL; ++u) load_pack<T>(xv + (nvec - 1 - (i + u * GN_THREADS)) * V, v[u]);
#pragma unroll
    for (int u = 0; u < GN_UNROLL; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) v[u][k] = f(v[u][k]);
      store_pack<T>(yv + (nvec - 1 - (i + u * GN_THREADS)) * V, v[u]);
    }
  }
  for (; i < nvec; i += GN_THREADS) {
    float v[V];
    load_pack<T>(xv + (nvec - 1 - i) * V, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = f(v[k]);
    store_pack<T>(yv + (nvec - 1 - i) * V, v);
  }
  if (tail0 + t < len) py[tail0 + t] = from_f<T>(f(to_f(px[tail0 + t])));
}

// The effective upstream gradient g = dy * d silu(z)/dz, z = xhat * w + b (or dy without SiLU).
struct BwdElem {
  float mean, rstd, wc, bc;
  int silu;
  __device__ __forceinline__ void operator()(float xv, float dyv, float& xhat, float& g) const {
    xhat = (xv - mean) * rstd;
    if (silu) {
      const float z = fmaf(xhat, wc, bc);
      const float sg = sigmoidf_(z);
      g = dyv * sg * fmaf(z, 1.f - sg, 1.f);
    } else {
      g = dyv;
    }
  }
};

// Per (row, chunk): ab[(row * RS + s) * 2 + {0, 1}] = (sum g * xhat, sum g). Grid: N * C * RS.
template <typename T>
__device__ void gn_bwd_reduce(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                              const T* __restrict__ dy, const float* __restrict__ part, float* __restrict__ ab,
                              int C, int G, i64 HW, i64 rchunk, int RS, int S, float eps, int silu) {
  constexpr int V = Pack<T>::N;
  const RowBlock rb = row_block(true, C, G, HW, rchunk, RS);
  BwdElem e;
  group_stats(part, rb.ng, S, eps, e.mean, e.rstd);
  e.wc = to_f(w[rb.c]);
  e.bc = to_f(bias[rb.c]);
  e.silu = silu;
  const i64 off = rb.row * HW + rb.start;
  const T* px = x + off;
  const T* pd = dy + off;
  const i64 len = rb.len;
  float sa = 0.f, sb = 0.f;
  const bool vec_ok = (((uintptr_t)px ^ (uintptr_t)pd) & 15) == 0;
  const i64 head = vec_ok ? head_len<T>(px, len) : len;
  const i64 nvec = (len - head) / V;
  const i64 tail0 = head + nvec * V;
  const int t = threadIdx.x;
  float xh, g;
  for (i64 i = t; i < head; i += GN_THREADS) {
    e(to_f(px[i]), to_f(pd[i]), xh, g);
    sa = fmaf(g, xh, sa);
    sb += g;
  }
  const T* xv = px + head;
  const T* dv = pd + head;
  i64 i = t;
  // Last to first, like gn_fwd_apply (x's chunk ends are in L2 after gn_stats).
  for (; i + (GN_UNROLL / 2 - 1) * GN_THREADS < nvec; i += (GN_UNROLL / 2) * GN_THREADS) {
    float vx[GN_UNROLL / 2][V], vd[GN_UNROLL / 2][V];
#pragma unroll
    for (int u = 0; u < GN_UNROLL / 2; ++u) {
      const i64 j = nvec - 1 - (i + u * GN_THREADS);
      load_pack<T>(xv + j * V, vx[u]);
      load_pack<T>(dv + j * V, vd[u]);
    }
#pragma unroll
    for (int u = 0; u < GN_UNROLL / 2; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        e(vx[u][k], vd[u][k], xh, g);
        sa = fmaf(g, xh, sa);
        sb += g;
      }
    }
  }
  for (; i < nvec; i += GN_THREADS) {
    float vx[V], vd[V];
    load_pack<T>(xv + (nvec - 1 - i) * V, vx);
    load_pack<T>(dv + (nvec - 1 - i) * V, vd);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      e(vx[k], vd[k], xh, g);
      sa = fmaf(g, xh, sa);
      sb += g;
    }
  }
  if (tail0 + t < len) {
    e(to_f(px[tail0 + t]), to_f(pd[tail0 + t]), xh, g);
    sa = fmaf(g, xh, sa);
    sb += g;
  }
  block_sum2(sa, sb);
  if (t == 0) {
    const i64 bid = (i64)gridDim.x - 1 - (i64)blockIdx.x;  // = row * RS + s
    ab[bid * 2] = sa;
    ab[bid * 2 + 1] = sb;
  }
}

// Per group (grid N * G): coef[ng * 4 + {0..3}] = (mean, rstd, m1, m2) with
// m1 = sum_c w_c B[n, c] / L and m2 = sum_c w_c A[n, c] / L. Blocks of sample 0 also write
// dweight[c] = sum_n A[n, c] and dbias[c] = sum_n B[n, c] for the channels of their group.
template <typename T>
__device__ void gn_bwd_finalize(const float* __restrict__ part, const float* __restrict__ ab,
                                const T* __restrict__ w, float* __restrict__ coef, T* __restrict__ dw,
                                T* __restrict__ db, int N, int C, int G, i64 HW, int RS, int S, float eps) {
  const i64 ng = blockIdx.x;
  const i64 n = ng / G;
  const int g = (int)(ng % G);
  const int Cg = C / G;
  float mean, rstd;
  group_stats(part, ng, S, eps, mean, rstd);
  float swa = 0.f, swb = 0.f;
  for (int cl = threadIdx.x; cl < Cg; cl += GN_THREADS) {
    const int c = g * Cg + cl;
    const float* p = ab + (n * C + c) * (i64)RS * 2;
    float a = 0.f, b = 0.f;
    for (int s = 0; s < RS; ++s) { a += p[2 * s]; b += p[2 * s + 1]; }
    const float wc = to_f(w[c]);
    swa = fmaf(wc, a, swa);
    swb = fmaf(wc, b, swb);
  }
  block_sum2(swa, swb);
  if (threadIdx.x == 0) {
    const float inv_l = 1.f / ((float)Cg * (float)HW);
    float* o = coef + ng * 4;
    o[0] = mean;
    o[1] = rstd;
    o[2] = swb * inv_l;
    o[3] = swa * inv_l;
  }
  if (n == 0) {
    for (int cl = threadIdx.x; cl < Cg; cl += GN_THREADS) {
      const int c = g * Cg + cl;
      float a = 0.f, b = 0.f;
      for (int nn = 0; nn < N; ++nn) {
        const float* p = ab + ((i64)nn * C + c) * (i64)RS * 2;
        for (int s = 0; s < RS; ++s) { a += p[2 * s]; b += p[2 * s + 1]; }
      }
      dw[c] = from_f<T>(a);
      db[c] = from_f<T>(b);
    }
  }
}

// dx = rstd * (w * g - m1 - xhat * m2). Grid: N * C * RS (forward order: it starts where
// gn_bwd_reduce ended).
template <typename T>
__device__ void gn_bwd_dx(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                          const T* __restrict__ dy, const float* __restrict__ coef, T* __restrict__ dx, int C,
                          int G, i64 HW, i64 rchunk, int RS, int silu) {
  constexpr int V = Pack<T>::N;
  const RowBlock rb = row_block(false, C, G, HW, rchunk, RS);
  BwdElem e;
  const float* cf = coef + rb.ng * 4;
  e.mean = cf[0];
  e.rstd = cf[1];
  e.wc = to_f(w[rb.c]);
  e.bc = to_f(bias[rb.c]);
  e.silu = silu;
  const float k1 = e.rstd * e.wc;          // multiplies g
  const float k2 = -e.rstd * cf[3];        // multiplies xhat
  const float k3 = -e.rstd * cf[2];        // constant
  const i64 off = rb.row * HW + rb.start;
  const T* px = x + off;
  const T* pd = dy + off;
  T* po = dx + off;
  const i64 len = rb.len;
  auto f = [&](float xv, float dyv) {
    float xh, g;
    e(xv, dyv, xh, g);
    return fmaf(k1, g, fmaf(k2, xh, k3));
  };
  const bool vec_ok = ((((uintptr_t)px ^ (uintptr_t)pd) | ((uintptr_t)px ^ (uintptr_t)po)) & 15) == 0;
  const i64 head = vec_ok ? head_len<T>(px, len) : len;
  const i64 nvec = (len - head) / V;
  const i64 tail0 = head + nvec * V;
  const int t = threadIdx.x;
  for (i64 i = t; i < head; i += GN_THREADS) po[i] = from_f<T>(f(to_f(px[i]), to_f(pd[i])));
  const T* xv = px + head;
  const T* dv = pd + head;
  T* ov = po + head;
  i64 i = t;
  for (; i + (GN_UNROLL / 2 - 1) * GN_THREADS < nvec; i += (GN_UNROLL / 2) * GN_THREADS) {
    float vx[GN_UNROLL / 2][V], vd[GN_UNROLL / 2][V];
#pragma unroll
    for (int u = 0; u < GN_UNROLL / 2; ++u) {
      load_pack<T>(xv + (i + u * GN_THREADS) * V, vx[u]);
      load_pack<T>(dv + (i + u * GN_THREADS) * V, vd[u]);
    }
#pragma unroll
    for (int u = 0; u < GN_UNROLL / 2; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) vx[u][k] = f(vx[u][k], vd[u][k]);
      store_pack<T>(ov + (i + u * GN_THREADS) * V, vx[u]);
    }
  }
  for (; i < nvec; i += GN_THREADS) {
    float vx[V], vd[V];
    load_pack<T>(xv + i * V, vx);
    load_pack<T>(dv + i * V, vd);
#pragma unroll
    for (int k = 0; k < V; ++k) vx[k] = f(vx[k], vd[k]);
    store_pack<T>(ov + i * V, vx);
  }
  if (tail0 + t < len) po[tail0 + t] = from_f<T>(f(to_f(px[tail0 + t]), to_f(pd[tail0 + t])));
}

// ---------------------------------------------------------------- launch parameters
// Each kernel takes ONE argument, a parameter struct passed by value. The structs are
// mirrored field for field by #[repr(C)] structs in kernels/src/cuda/group_norm.rs (device
// pointers are u64 there); the static_asserts below and the const asserts there pin the
// same sizes and offsets, and the host check (kernels/cuda/host-check) builds these very
// structs. Pointers first, then 8-byte integers, then 4-byte fields: no hidden padding.

// The geometry and options shared by every kernel of one call (see the file header).
struct GnDims {
  i64 HW;      // spatial size of a row
  i64 L;       // elements per group, Cg * HW
  i64 chunk;   // stats chunk (elements)
  i64 rchunk;  // row chunk (elements)
  int N, C, G;
  int S;       // stats chunks per group
  int RS;      // row chunks per row
  float eps;
  int silu;    // 0 or 1
  int pad;     // explicit tail padding (0)
};

template <typename T> struct GnStatsParams {
  const T* x;
  float* part;
  GnDims d;
};

template <typename T> struct GnFwdApplyParams {
  const T* x;
  const T* w;
  const T* b;
  T* y;
  const float* part;
  GnDims d;
};

template <typename T> struct GnBwdReduceParams {
  const T* x;
  const T* w;
  const T* b;
  const T* dy;
  const float* part;
  float* ab;
  GnDims d;
};

template <typename T> struct GnBwdFinalizeParams {
  const float* part;
  const float* ab;
  const T* w;
  float* coef;
  T* dw;
  T* db;
  GnDims d;
};

template <typename T> struct GnBwdDxParams {
  const T* x;
  const T* w;
  const T* b;
  const T* dy;
  const float* coef;
  T* dx;
  GnDims d;
};

// Keep in sync with the const asserts in kernels/src/cuda/group_norm.rs.
static_assert(sizeof(void*) == 8, "64-bit device pointers expected");
static_assert(sizeof(GnDims) == 64 && offsetof(GnDims, N) == 32 && offsetof(GnDims, eps) == 52 &&
                  offsetof(GnDims, silu) == 56, "GnDims layout");
static_assert(sizeof(GnStatsParams<float>) == 80 && offsetof(GnStatsParams<float>, d) == 16, "GnStatsParams layout");
static_assert(sizeof(GnFwdApplyParams<float>) == 104 && offsetof(GnFwdApplyParams<float>, d) == 40,
              "GnFwdApplyParams layout");
static_assert(sizeof(GnBwdReduceParams<float>) == 112 && offsetof(GnBwdReduceParams<float>, d) == 48,
              "GnBwdReduceParams layout");
static_assert(sizeof(GnBwdFinalizeParams<float>) == 112 && offsetof(GnBwdFinalizeParams<float>, d) == 48,
              "GnBwdFinalizeParams layout");
static_assert(sizeof(GnBwdDxParams<float>) == 112 && offsetof(GnBwdDxParams<float>, d) == 48, "GnBwdDxParams layout");

// ---------------------------------------------------------------- extern "C" entry points
#define GN_INSTANTIATE(SUF, T)                                                                          \
  extern "C" __global__ void __launch_bounds__(GN_THREADS) gn_stats_##SUF(const GnStatsParams<T> p) {  \
    gn_stats<T>(p.x, p.part, p.d.L, p.d.chunk, p.d.S);                                                  \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(GN_THREADS) gn_fwd_apply_##SUF(const GnFwdApplyParams<T> p) { \
    gn_fwd_apply<T>(p.x, p.w, p.b, p.y, p.part, p.d.C, p.d.G, p.d.HW, p.d.rchunk, p.d.RS, p.d.S, p.d.eps, \
                    p.d.silu);                                                                          \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(GN_THREADS)                                              \
      gn_bwd_reduce_##SUF(const GnBwdReduceParams<T> p) {                                               \
    gn_bwd_reduce<T>(p.x, p.w, p.b, p.dy, p.part, p.ab, p.d.C, p.d.G, p.d.HW, p.d.rchunk, p.d.RS, p.d.S, \
                     p.d.eps, p.d.silu);                                                                \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(GN_THREADS)                                              \
      gn_bwd_finalize_##SUF(const GnBwdFinalizeParams<T> p) {                                           \
    gn_bwd_finalize<T>(p.part, p.ab, p.w, p.coef, p.dw, p.db, p.d.N, p.d.C, p.d.G, p.d.HW, p.d.RS, p.d.S, \
                       p.d.eps);                                                                        \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(GN_THREADS) gn_bwd_dx_##SUF(const GnBwdDxParams<T> p) {  \
    gn_bwd_dx<T>(p.x, p.w, p.b, p.dy, p.coef, p.dx, p.d.C, p.d.G, p.d.HW, p.d.rchunk, p.d.RS, p.d.silu);  \
  }

GN_INSTANTIATE(f32, float)
GN_INSTANTIATE(f16, __half)
GN_INSTANTIATE(bf16, __nv_bfloat16)
