// Runs kernels/cuda/group_norm.cu on the CPU (shim.h) against a double-precision reference:
// forward y and backward dx, dweight, dbias, f32/f16/bf16, with and without SiLU, on shapes
// that exercise several stats/row chunks per group/row, odd sizes, misaligned base pointers,
// H*W = 1, a large mean and constant input. Outputs are poisoned with NaN first.
//   bash scripts/cuda-host-check/run.sh
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include "../../kernels/cuda/group_norm.cu"

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

template <typename T>
static void run_case(const Case& k, bool silu, const char* tname, double rtol, double atol,
                     void (*stats)(const T*, float*, i64, i64, int),
                     void (*apply)(const T*, const T*, const T*, T*, const float*, int, int, i64, i64, int, int, float, int),
                     void (*reduce)(const T*, const T*, const T*, const T*, const float*, float*, int, int, i64, i64, int, int, float, int),
                     void (*fin)(const float*, const float*, const T*, float*, T*, T*, int, int, int, i64, int, int, float),
                     void (*dxk)(const T*, const T*, const T*, const T*, const float*, T*, int, int, i64, i64, int, int)) {
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
  launch(N * G * S, GN_THREADS, [&] { stats(x, part.data(), L, st.chunk, S); });
  launch(N * C * RS, GN_THREADS, [&] { apply(x, w.data(), b.data(), y, part.data(), C, G, HW, rs.chunk, RS, S, eps, silu); });
  // Backward (stats recomputed, as the Rust side does).
  std::vector<float> part2(part.size(), NAN);
  launch(N * G * S, GN_THREADS, [&] { stats(x, part2.data(), L, st.chunk, S); });
  launch(N * C * RS, GN_THREADS, [&] { reduce(x, w.data(), b.data(), dy, part2.data(), ab.data(), C, G, HW, rs.chunk, RS, S, eps, silu); });
  T* dx = outb.data();
  T* dw = dx + numel;
  T* db = dw + C;
  launch(N * G, GN_THREADS, [&] { fin(part2.data(), ab.data(), w.data(), coef.data(), dw, db, N, C, G, HW, RS, S, eps); });
  launch(N * C * RS, GN_THREADS, [&] { dxk(x, w.data(), b.data(), dy, coef.data(), dx, C, G, HW, rs.chunk, RS, silu); });

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

int main() {
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
      run_case<float>(k, silu, "f32", 1e-4 * tm, 1e-5 * tm, gn_stats_f32, gn_fwd_apply_f32, gn_bwd_reduce_f32, gn_bwd_finalize_f32, gn_bwd_dx_f32);
      run_case<__half>(k, silu, "f16", 2e-3, 1e-3 * tm, gn_stats_f16, gn_fwd_apply_f16, gn_bwd_reduce_f16, gn_bwd_finalize_f16, gn_bwd_dx_f16);
      run_case<__nv_bfloat16>(k, silu, "bf16", 1e-2, 8e-3 * tm, gn_stats_bf16, gn_fwd_apply_bf16, gn_bwd_reduce_bf16, gn_bwd_finalize_bf16, gn_bwd_dx_bf16);
    }
  printf(failures ? "RESULT: FAIL (%d)\n" : "RESULT: PASS\n", failures);
  return failures ? 1 : 0;
}
