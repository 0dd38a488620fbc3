// Runs kernels/cuda/group_norm.cu on the CPU (shim.h) against a double-precision reference:
// forward y and backward dx, dweight, dbias, f32/f16/bf16, with and without SiLU, on shapes
// that exercise several stats/row chunks per group/row, odd sizes, misaligned base pointers,
// H*W = 1, a large mean and constant input. Outputs are poisoned with NaN first. The kernels
// are called through their extern "C" entry points with the same parameter structs the Rust
// host code mirrors, and util.cu's fill_u8 is checked too.
//   bash kernels/cuda/host-check/run.sh
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include "../group_norm.cu"
#include "../util.cu"

template <typename T> T cvt(float v) { return from_f<T>(v); }

struct Split { long long chunk; int count; };
// Mirror of kernels/src/cuda/group_norm.rs `split`, with the minimum chunk as a parameter.
static Split split(long long len, long long parallel, long long target, long long min_chunk) {
  long long want = std::max(1LL, (target + parallel - 1) / parallel);
  long long count = std::max(1LL, std::min(want, (len + min_chunk - 1) / min_chunk));
  long long chunk = (len + count - 1) / count;
  chunk = (chunk + 63) / 64 * 64;
  return {chunk, (int)((len + chunk - 1) / chunk)};
}

struct Case { int n, c, hw, g; float mean, std; bool constant; int x_off, y_off; long long min_chunk; };

static int failures = 0;

static void expect(const char* name, const char* what, const std::vector<float>& got,
                   const std::vector<double>& want, double rtol, double atol) {
  double scale = 1;
  for (double w : want) if (std::isfinite(w)) scale = std::max(scale, std::fabs(w));
  double worst = 0; size_t wi = 0; int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double e = std::fabs((double)got[i] - want[i]);
    double lim = std::max(rtol * std::fabs(want[i]), atol * scale);
    double r = std::isnan(got[i]) ? 1e30 : e / lim;
    if (r > 1) ++bad;
    if (r > worst) { worst = r; wi = i; }
  }
  if (bad) {
    ++failures;
    printf("FAIL %s %s: %d/%zu bad, worst %g at %zu: got %g want %g\n", name, what, bad, got.size(),
           worst, wi, got[wi], want[wi]);
  }
}

template <typename T> struct Kernels {
  void (*stats)(GnStatsParams<T>);
  void (*apply)(GnFwdApplyParams<T>);
  void (*reduce)(GnBwdReduceParams<T>);
  void (*fin)(GnBwdFinalizeParams<T>);
  void (*dx)(GnBwdDxParams<T>);
};

template <typename T>
static void run_case(const Case& k, bool silu, const char* tname, double rtol, double atol, Kernels<T> kn) {
  const int N = k.n, C = k.c, HW = k.hw, G = k.g, Cg = C / G;
  const long long numel = (long long)N * C * HW, L = (long long)Cg * HW;
  const float eps = 1e-5f;
  std::mt19937 rng(1234 + N * 7 + C * 13 + HW);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<T> xbuf(numel + 16), ybuf(numel + 16), dybuf(numel + 16), w(C), b(C);
  std::vector<T> outb(numel + 2 * C + 16);
  T* x = xbuf.data() + k.x_off;
  T* dy = dybuf.data() + k.x_off;
  for (long long i = 0; i < numel; ++i) {
    x[i] = cvt<T>(k.constant ? 3.0f : k.mean + k.std * nd(rng));
    dy[i] = cvt<T>(nd(rng));
  }
  for (int c = 0; c < C; ++c) { w[c] = cvt<T>(1.f + 0.5f * nd(rng)); b[c] = cvt<T>(0.5f * nd(rng)); }
  T* y = ybuf.data() + k.y_off;
  const T nanv = cvt<T>(NAN);
  for (auto& v : ybuf) v = nanv;
  for (auto& v : outb) v = nanv;

  Split st = split(L, (long long)N * G, 1024, k.min_chunk);
  Split rs = split(HW, (long long)N * C, 1024, k.min_chunk);
  std::vector<float> part(3 * (size_t)N * G * st.count, NAN), ab(2 * (size_t)N * C * rs.count, NAN),
      coef(4 * (size_t)N * G, NAN);
  const int S = st.count, RS = rs.count;
  const GnDims d{HW, L, st.chunk, rs.chunk, N, C, G, S, RS, eps, silu ? 1 : 0, 0};
  launch(N * G * S, GN_THREADS, [&] { kn.stats({x, part.data(), d}); });
  launch(N * C * RS, GN_THREADS, [&] { kn.apply({x, w.data(), b.data(), y, part.data(), d}); });
  // Backward (stats recomputed, as the Rust side does).
  std::vector<float> part2(part.size(), NAN);
  launch(N * G * S, GN_THREADS, [&] { kn.stats({x, part2.data(), d}); });
  launch(N * C * RS, GN_THREADS, [&] { kn.reduce({x, w.data(), b.data(), dy, part2.data(), ab.data(), d}); });
  T* dx = outb.data();
  T* dw = dx + numel;
  T* db = dw + C;
  launch(N * G, GN_THREADS, [&] { kn.fin({part2.data(), ab.data(), w.data(), coef.data(), dw, db, d}); });
  launch(N * C * RS, GN_THREADS, [&] { kn.dx({x, w.data(), b.data(), dy, coef.data(), dx, d}); });

  // Reference in double from the same (rounded) inputs.
  std::vector<double> ry(numel), rdx(numel), rdw(C, 0), rdb(C, 0);
  for (int n = 0; n < N; ++n)
    for (int g = 0; g < G; ++g) {
      const long long base = ((long long)n * C + g * Cg) * HW;
      double s = 0;
      for (long long i = 0; i < L; ++i) s += to_f(x[base + i]);
      const double mean = s / L;
      double q = 0;
      for (long long i = 0; i < L; ++i) { double d = to_f(x[base + i]) - mean; q += d * d; }
      const double rstd = 1.0 / std::sqrt(q / L + eps);
      double m1 = 0, m2 = 0;
      std::vector<double> gg(L), xh(L);
      for (long long i = 0; i < L; ++i) {
        const int c = g * Cg + (int)(i / HW);
        const double xhat = (to_f(x[base + i]) - mean) * rstd;
        const double z = xhat * to_f(w[c]) + to_f(b[c]);
        const double sg = 1.0 / (1.0 + std::exp(-z));
        ry[base + i] = silu ? z * sg : z;
        const double gv = silu ? to_f(dy[base + i]) * sg * (1 + z * (1 - sg)) : to_f(dy[base + i]);
        gg[i] = gv; xh[i] = xhat;
        m1 += gv * to_f(w[c]);
        m2 += gv * to_f(w[c]) * xhat;
        rdw[c] += gv * xhat;
        rdb[c] += gv;
      }
      m1 /= L; m2 /= L;
      for (long long i = 0; i < L; ++i) {
        const int c = g * Cg + (int)(i / HW);
        rdx[base + i] = rstd * (gg[i] * to_f(w[c]) - m1 - xh[i] * m2);
      }
    }
  auto f = [](const T* p, long long n) { std::vector<float> v(n); for (long long i = 0; i < n; ++i) v[i] = to_f(p[i]); return v; };
  char name[200];
  snprintf(name, sizeof name, "%s %s N=%d C=%d HW=%d G=%d mean=%g const=%d xoff=%d yoff=%d S=%d RS=%d", tname,
           silu ? "silu" : "none", N, C, HW, G, k.mean, k.constant, k.x_off, k.y_off, S, RS);
  int before = failures;
  expect(name, "y", f(y, numel), ry, rtol, atol);
  expect(name, "dx", f(dx, numel), rdx, rtol, atol * 10);
  expect(name, "dweight", f(dw, C), rdw, rtol, atol * 10);
  expect(name, "dbias", f(db, C), rdb, rtol, atol * 10);
  // Nothing written outside y.
  for (int i = 0; i < k.y_off; ++i) if (!std::isnan(to_f(ybuf[i]))) { ++failures; printf("FAIL %s: wrote before y\n", name); break; }
  for (long long i = k.y_off + numel; i < (long long)ybuf.size(); ++i) if (!std::isnan(to_f(ybuf[i]))) { ++failures; printf("FAIL %s: wrote after y\n", name); break; }
  for (long long i = numel + 2 * C; i < (long long)outb.size(); ++i) if (!std::isnan(to_f(outb[i]))) { ++failures; printf("FAIL %s: wrote after db\n", name); break; }
  if (failures == before) printf("PASS %s\n", name);
}

// The host stand-ins of include/ against known bit patterns (round to nearest even).
static void check_conversions() {
  struct H { float f; uint16_t bits; } hs[] = {
      {1.f, 0x3c00}, {-2.f, 0xc000}, {65504.f, 0x7bff}, {65519.f, 0x7bff}, {65520.f, 0x7c00},
      {1.f / 3, 0x3555}, {5.960464477539063e-8f, 0x0001}, {2.98e-8f, 0x0000}, {6.103515625e-5f, 0x0400},
      {1.0009765625f + 0.00048828125f, 0x3c02} /* tie -> even */, {INFINITY, 0x7c00}};
  for (const H& h : hs)
    if (__float2half_rn(h.f).bits != h.bits || (std::isfinite(h.f) && h.f <= 65504.f && std::fabs(h.f) > 1e-7f &&
                                                 __half2float(__half{h.bits}) != to_f(from_f<__half>(h.f)))) {
      ++failures;
      printf("FAIL f16 conversion of %g: got 0x%04x want 0x%04x\n", h.f, __float2half_rn(h.f).bits, h.bits);
    }
  if (!std::isnan(__half2float(__float2half_rn(NAN)))) { ++failures; printf("FAIL f16 NaN\n"); }
  struct B { float f; uint16_t bits; } bs[] = {{1.f, 0x3f80}, {1.f / 3, 0x3eab}, {-3.f, 0xc040}, {1.00390625f, 0x3f80}};
  for (const B& b : bs)
    if (__float2bfloat16_rn(b.f).bits != b.bits) {
      ++failures;
      printf("FAIL bf16 conversion of %g: got 0x%04x want 0x%04x\n", b.f, __float2bfloat16_rn(b.f).bits, b.bits);
    }
  if (!std::isnan(__bfloat162float(__float2bfloat16_rn(NAN)))) { ++failures; printf("FAIL bf16 NaN\n"); }
  if (__half2float(__half{0x0001}) != 5.960464477539063e-8f || __half2float(__half{0xc000}) != -2.f) {
    ++failures;
    printf("FAIL f16 -> f32\n");
  }
}

// util.cu's fill_u8 writes exactly bytes [0, n).
static void check_fill() {
  std::vector<unsigned char> buf(1000 + 8, 0);
  launch(3, 64, [&] { fill_u8({buf.data() + 3, 1000, 0xFFu, 0}); });
  for (size_t i = 0; i < buf.size(); ++i) {
    const bool in = i >= 3 && i < 1003;
    if (buf[i] != (in ? 0xFF : 0)) { ++failures; printf("FAIL fill_u8 at byte %zu\n", i); return; }
  }
  printf("PASS fill_u8\n");
}

int main() {
  check_conversions();
  check_fill();
  const Case cases[] = {
      {2, 6, 1000, 3, 0, 1, false, 0, 0, 128},    // several stats and row chunks
      {1, 4, 997, 2, 0, 1, false, 1, 0, 64},      // odd HW, misaligned x, aligned y (scalar rows)
      {1, 4, 997, 2, 0, 1, false, 3, 3, 64},      // same misalignment for x and y (vector rows + heads)
      {3, 8, 1, 4, 0, 1, false, 0, 0, 4096},      // HW = 1
      {2, 48, 63, 6, 0, 1, false, 0, 0, 4096},    // C = 48, G = 6
      {1, 32, 37, 32, 0, 1, false, 0, 0, 4096},   // one channel per group
      {2, 4, 640, 2, 1000, 1, false, 0, 0, 64},   // large mean
      {2, 4, 64, 2, 0, 1, true, 0, 0, 64},        // constant input
      {1, 2, 3000, 1, 0, 1, false, 0, 0, 4096},   // one group, 2 stats chunks of 4096 -> 1
  };
  for (const Case& k : cases)
    for (bool silu : {true, false}) {
      double tm = k.mean > 100 ? 10 : 1;
      run_case<float>(k, silu, "f32", 1e-4 * tm, 1e-5 * tm,
                      {gn_stats_f32, gn_fwd_apply_f32, gn_bwd_reduce_f32, gn_bwd_finalize_f32, gn_bwd_dx_f32});
      run_case<__half>(k, silu, "f16", 2e-3, 1e-3 * tm,
                       {gn_stats_f16, gn_fwd_apply_f16, gn_bwd_reduce_f16, gn_bwd_finalize_f16, gn_bwd_dx_f16});
      run_case<__nv_bfloat16>(k, silu, "bf16", 1e-2, 8e-3 * tm,
                              {gn_stats_bf16, gn_fwd_apply_bf16, gn_bwd_reduce_bf16, gn_bwd_finalize_bf16, gn_bwd_dx_bf16});
    }
  printf(failures ? "RESULT: FAIL (%d)\n" : "RESULT: PASS\n", failures);
  return failures ? 1 : 0;
}
