//! Suite `gn`: keel's fused GroupNorm(+SiLU) on CUDA (issue 3).
//!
//! test: for every case x dtype (f32, f16, bf16) x {SiLU, none}, the CUDA op, the CPU op
//! and the composed reference (`group_norm(_silu)_slow` on CPU in f32 from the same
//! rounded inputs) agree on y and on the gradients of x, weight and bias (upstream gradient
//! r: loss = sum(y * r)). Output buffers are poisoned with NaN first (see main.rs).
//!
//! bench: the 6 shapes x 3 dtypes of shared/GPU.md, keel fused vs candle_nn::GroupNorm +
//! silu, forward and forward+backward (candle autograd, `y.backward()`), median ms, plus the
//! cost candle's autograd adds on its own (seed ones + zeros + add on x); JSON lines.

use crate::util::{compare, time_ms, BenchOpts, Tol};
use anyhow::Result;
use candle::{DType, Device, Module, Tensor, Var};
use keel_kernels::{group_norm, group_norm_silu, group_norm_silu_slow, group_norm_slow};

const EPS: f64 = 1e-5;

/// How a case's x is made.
#[derive(Clone, Copy, Debug)]
enum Input {
    /// mean + std * N(0, 1).
    Normal { mean: f32, std: f32 },
    /// Every element equal.
    Constant(f32),
    /// N(0, 1) with one NaN in group 0 of sample 0.
    WithNan,
    /// N(0, 1), x a view with a start offset (narrow of a batch one larger): misaligned
    /// base pointer for the 16-byte loads.
    Offset,
}

struct Case {
    shape: &'static [usize],
    groups: usize,
    input: Input,
    /// Multiplies the dtype's tolerances (large-mean inputs lose digits in any f32 code).
    tol_mul: f32,
}

const fn case(shape: &'static [usize], groups: usize, input: Input, tol_mul: f32) -> Case {
    Case {
        shape,
        groups,
        input,
        tol_mul,
    }
}

const N01: Input = Input::Normal {
    mean: 0.0,
    std: 1.0,
};

const CASES: &[Case] = &[
    case(&[1, 32, 16, 16], 32, N01, 1.0), // N = 1, one channel per group
    case(&[2, 48, 7, 9], 6, N01, 1.0),    // C = 48, G = 6, odd H*W = 63
    case(&[3, 64, 1, 1], 32, N01, 1.0),   // H*W = 1
    case(&[3, 64], 32, N01, 1.0),         // rank 2 (H*W = 1)
    case(&[1, 96, 33, 31], 32, N01, 1.0), // odd sizes, H*W = 1023, 3 channels per group
    case(&[2, 40, 5, 3, 3], 8, N01, 1.0), // rank 5
    case(&[4, 64, 64, 64], 32, N01, 1.0), // vector path, several blocks per group
    case(&[1, 128, 128, 128], 32, N01, 1.0), // N = 1: 16 stats blocks per group, 4 per row
    case(&[1, 32, 257, 259], 32, N01, 1.0), // odd H*W: misaligned rows, 17 blocks per row
    case(&[16, 320, 8, 8], 32, N01, 1.0), // N = 16, 10 channels per group
    case(
        &[2, 64, 32, 32],
        32,
        Input::Normal {
            mean: 1e3,
            std: 1.0,
        },
        10.0,
    ), // large mean
    case(&[2, 32, 8, 8], 32, Input::Constant(3.0), 1.0), // rstd = 1/sqrt(eps)
    case(&[2, 6, 5, 7], 3, Input::Offset, 1.0), // start offset 210 elements
    case(&[2, 64, 8, 8], 32, Input::WithNan, 1.0), // NaN propagates within its group
];

/// Deterministic N(0, 1) samples (xorshift64* + Box-Muller).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2) = (self.uniform(), self.uniform());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }
}

fn tol(dtype: DType, grad: bool, mul: f32) -> Tol {
    let (rtol, atol) = match (dtype, grad) {
        (DType::F32, false) => (1e-4, 1e-5),
        (DType::F32, true) => (1e-3, 1e-4),
        (DType::F16, _) => (4e-3, 2e-3),
        _ => (3e-2, 1.6e-2), // bf16: 8 significant bits
    };
    Tol {
        rtol: rtol * mul,
        atol: atol * mul,
    }
}

/// y and the gradients of (x, weight, bias) for loss = sum(y * r).
struct Out {
    y: Tensor,
    dx: Tensor,
    dw: Tensor,
    db: Tensor,
}

type GnFn = fn(&Tensor, &Tensor, &Tensor, usize, f64) -> candle::Result<Tensor>;

/// Runs `f` on x (or, with `narrow = Some(n)`, on the view `x.narrow(0, 1, n)`, which keeps
/// a start offset into x's storage: a Var copies its tensor, so the view is taken after).
fn run(
    f: GnFn,
    x: &Tensor,
    narrow: Option<usize>,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
    groups: usize,
) -> Result<Out> {
    let (xv, wv, bv) = (
        Var::from_tensor(x)?,
        Var::from_tensor(w)?,
        Var::from_tensor(b)?,
    );
    let xin = match narrow {
        Some(n) => xv.as_tensor().narrow(0, 1, n)?,
        None => xv.as_tensor().clone(),
    };
    let y = f(&xin, wv.as_tensor(), bv.as_tensor(), groups, EPS)?;
    let grads = (&y * r)?.sum_all()?.backward()?;
    let get = |v: &Var, what: &str| {
        grads
            .get(v.as_tensor())
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no gradient for {what}"))
    };
    let dx = get(&xv, "x")?;
    Ok(Out {
        dx: match narrow {
            Some(n) => dx.narrow(0, 1, n)?,
            None => dx,
        },
        dw: get(&wv, "weight")?,
        db: get(&bv, "bias")?,
        y,
    })
}

/// Runs every case; returns the number of failed ones.
pub fn test(dev: &Device) -> Result<usize> {
    let cpu = Device::Cpu;
    let mut failed = 0;
    let mut total = 0;
    for (ci, c) in CASES.iter().enumerate() {
        let shape = c.shape.to_vec();
        let ch = shape[1];
        let numel: usize = shape.iter().product();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (ci as u64 + 1));
        // The Offset case builds a batch one larger and narrows it on both devices.
        let mut big_shape = shape.clone();
        if matches!(c.input, Input::Offset) {
            big_shape[0] += 1;
        }
        let big_numel: usize = big_shape.iter().product();
        let mut xs = match c.input {
            Input::Normal { mean, std } => rng
                .normal(big_numel)
                .into_iter()
                .map(|v| mean + std * v)
                .collect(),
            Input::Constant(v) => vec![v; big_numel],
            Input::WithNan | Input::Offset => rng.normal(big_numel),
        };
        if matches!(c.input, Input::WithNan) {
            xs[5] = f32::NAN;
        }
        let wv: Vec<f32> = rng.normal(ch).iter().map(|v| 1.0 + 0.5 * v).collect();
        let bv: Vec<f32> = rng.normal(ch).iter().map(|v| 0.5 * v).collect();
        let rv = rng.normal(numel);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // Inputs rounded to the dtype once; everyone gets the same values.
            let x_big =
                Tensor::from_vec(xs.clone(), big_shape.as_slice(), &cpu)?.to_dtype(dtype)?;
            let w = Tensor::from_vec(wv.clone(), ch, &cpu)?.to_dtype(dtype)?;
            let b = Tensor::from_vec(bv.clone(), ch, &cpu)?.to_dtype(dtype)?;
            let r = Tensor::from_vec(rv.clone(), shape.as_slice(), &cpu)?.to_dtype(dtype)?;
            let narrow = matches!(c.input, Input::Offset).then_some(shape[0]);
            let x = x_big;
            let xg = x.to_device(dev)?;
            let (wg, bg, rg) = (w.to_device(dev)?, b.to_device(dev)?, r.to_device(dev)?);
            let f32c = |t: &Tensor| t.to_dtype(DType::F32);
            for silu in [true, false] {
                total += 1;
                let (fused, slow): (GnFn, GnFn) = if silu {
                    (group_norm_silu, group_norm_silu_slow)
                } else {
                    (group_norm, group_norm_slow)
                };
                let name = format!(
                    "gn {:4} {} x{:?} G={} {:?}",
                    format!("{dtype:?}").to_lowercase(),
                    if silu { "silu" } else { "none" },
                    shape,
                    c.groups,
                    c.input
                );
                let result = (|| -> Result<Vec<(bool, String)>> {
                    let gpu = run(fused, &xg, narrow, &wg, &bg, &rg, c.groups)?;
                    let cpu_out = run(fused, &x, narrow, &w, &b, &r, c.groups)?;
                    let reference = run(
                        slow,
                        &f32c(&x)?,
                        narrow,
                        &f32c(&w)?,
                        &f32c(&b)?,
                        &f32c(&r)?,
                        c.groups,
                    )?;
                    let mut checks = Vec::new();
                    for (what, g, cp, rf, grad) in [
                        ("y", &gpu.y, &cpu_out.y, &reference.y, false),
                        ("dx", &gpu.dx, &cpu_out.dx, &reference.dx, true),
                        ("dweight", &gpu.dw, &cpu_out.dw, &reference.dw, true),
                        ("dbias", &gpu.db, &cpu_out.db, &reference.db, true),
                    ] {
                        let t = tol(dtype, grad, c.tol_mul);
                        for (vs, want) in [("ref", rf), ("cpu", cp)] {
                            let cmp = compare(&format!("{what} cuda vs {vs}"), g, want, t)?;
                            checks.push((cmp.ok, cmp.msg));
                        }
                    }
                    Ok(checks)
                })();
                match result {
                    Ok(checks) => {
                        let ok = checks.iter().all(|(ok, _)| *ok);
                        if ok {
                            // One line per case, with the tightest margin seen.
                            println!("PASS {name}");
                        } else {
                            failed += 1;
                            println!("FAIL {name}");
                            for (ok, msg) in &checks {
                                println!("     {} {msg}", if *ok { "ok " } else { "BAD" });
                            }
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        println!("FAIL {name}: error {e:#}");
                    }
                }
            }
        }
    }
    println!("gn: {} of {total} cases passed", total - failed);
    Ok(failed)
}

/// The 6 shapes of shared/GPU.md (groups = 32, eps = 1e-5).
const BENCH_SHAPES: [[usize; 4]; 6] = [
    [1, 128, 256, 256],
    [2, 256, 128, 128],
    [8, 128, 128, 128],
    [4, 64, 512, 512],
    [2, 512, 64, 64],
    [16, 320, 64, 64],
];

/// Prints one JSON line per (impl, dtype, shape) on stdout.
pub fn bench(dev: &Device, opts: &BenchOpts) -> Result<()> {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let shapes = if opts.quick {
            &BENCH_SHAPES[..1]
        } else {
            &BENCH_SHAPES[..]
        };
        for s in shapes {
            let c = s[1];
            let x = Tensor::randn(0f32, 1.0, s, dev)?.to_dtype(dtype)?;
            let w = (Tensor::randn(0f32, 0.5, c, dev)? + 1.0)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 0.5, c, dev)?.to_dtype(dtype)?;
            let (xv, wv, bv) = (
                Var::from_tensor(&x)?,
                Var::from_tensor(&w)?,
                Var::from_tensor(&b)?,
            );
            let bytes = (x.elem_count() * dtype.size_in_bytes()) as f64;
            let shape = format!("{}x{}x{}x{}", s[0], s[1], s[2], s[3]);
            let dt = format!("{dtype:?}").to_lowercase();
            let emit = |imp: &str, fwd: f64, fb: f64| {
                let gbps = 2.0 * bytes / (fwd * 1e-3) / 1e9;
                println!(
                    r#"{{"kind":"gn","impl":"{imp}","dtype":"{dt}","shape":"{shape}","groups":32,"fwd_ms":{fwd:.5},"fwdbwd_ms":{fb:.5},"fwd_gbps":{gbps:.1}}}"#
                );
            };

            let fwd = time_ms(dev, opts, || {
                group_norm_silu(&x, &w, &b, 32, EPS)?;
                Ok(())
            })?;
            let fb = time_ms(dev, opts, || {
                let y = group_norm_silu(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), 32, EPS)?;
                y.backward()?;
                Ok(())
            })?;
            emit("keel", fwd, fb);
            // What candle's autograd itself adds to any op's fwd+bwd on x: the seed
            // `ones_like(y)`, then `zeros_like(x) + dx` when the gradient is stored.
            let autograd = time_ms(dev, opts, || {
                let seed = x.ones_like()?;
                x.zeros_like()?.add(&seed)?;
                Ok(())
            })?;
            println!(
                r#"{{"kind":"autograd","impl":"candle","dtype":"{dt}","shape":"{shape}","ms":{autograd:.5}}}"#
            );

            let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, 32, EPS)?;
            let gn_var = candle_nn::GroupNorm::new(
                wv.as_tensor().clone(),
                bv.as_tensor().clone(),
                c,
                32,
                EPS,
            )?;
            let fwd = time_ms(dev, opts, || {
                gn.forward(&x)?.silu()?;
                Ok(())
            })?;
            let fb = time_ms(dev, opts, || {
                let y = gn_var.forward(xv.as_tensor())?.silu()?;
                y.backward()?;
                Ok(())
            })?;
            emit("candle", fwd, fb);
        }
    }
    Ok(())
}
