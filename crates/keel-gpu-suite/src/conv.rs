//! Suite `conv` (issue 6): keel's conv2d on CUDA vs the CPU kernels, and the conv benchmark.
//!
//! keel's `cuda` feature always includes cuDNN, so the CUDA path under test is cuDNN. `test`
//! runs forward, dx, dw and dbias for every dtype on configurations covering stride 1/2,
//! padding 0-2, dilation 2, groups and depthwise, 1x1/3x3/7x7 kernels, odd and non-square
//! (7x8 at stride 2) sizes and batch 1; outputs are NaN-poisoned first (main sets
//! `KEEL_CUDA_POISON_OUTPUTS`), so an unwritten element fails. `bench` prints JSON lines
//! `{"kind":"conv","impl":"keel"|"candle",...}` for the 4 GPU shapes of ../shared/GPU.md
//! (3x3, padding 1) x {f32, f16, bf16}: forward, and forward+backward (grads of x and w).

use crate::util::{compare, time_ms, BenchOpts, Tol};
use anyhow::Result;
use candle::{DType, Device, Tensor, Var};
use keel_kernels::{conv2d, Conv2dParams};

/// (x shape, C_out, kernel, stride, padding, dilation, groups)
type Case = ([usize; 4], usize, usize, usize, usize, usize, usize);

const CASES: [Case; 9] = [
    ([2, 16, 17, 19], 24, 3, 1, 1, 1, 1),
    ([2, 8, 7, 8], 12, 3, 2, 1, 1, 1),
    ([1, 32, 16, 16], 32, 1, 1, 0, 1, 1),
    ([2, 24, 9, 10], 16, 1, 2, 0, 1, 1),
    ([1, 3, 33, 31], 16, 7, 2, 3, 1, 1),
    ([2, 8, 15, 13], 8, 3, 1, 2, 2, 1),
    ([2, 16, 12, 11], 24, 3, 2, 0, 1, 4),
    ([2, 32, 14, 15], 32, 3, 1, 1, 1, 32),
    ([1, 64, 32, 32], 64, 3, 1, 1, 1, 1),
];

/// The GPU shapes of ../shared/GPU.md: `(N, C, H, W)`, C_out = C, 3x3, padding 1.
const BENCH_SHAPES: [[usize; 4]; 4] = [
    [8, 64, 128, 128],
    [8, 128, 64, 64],
    [8, 256, 32, 32],
    [2, 64, 256, 256],
];

fn tol(dtype: DType) -> Tol {
    match dtype {
        DType::F32 => Tol {
            rtol: 1e-3,
            atol: 1e-4,
        },
        DType::F16 => Tol {
            rtol: 1e-2,
            atol: 5e-3,
        },
        _ => Tol {
            rtol: 4e-2,
            atol: 2e-2,
        },
    }
}

/// `[y, dx, dw, dbias]` with loss `sum(y * r)`.
fn run(x: &Tensor, w: &Tensor, b: &Tensor, r: &Tensor, p: &Conv2dParams) -> Result<[Tensor; 4]> {
    let (xv, wv, bv) = (
        Var::from_tensor(x)?,
        Var::from_tensor(w)?,
        Var::from_tensor(b)?,
    );
    let y = conv2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), p)?;
    let g = (&y * r)?.sum_all()?.backward()?;
    let get = |v: &Var| {
        g.get(v)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("missing gradient"))
    };
    Ok([y, get(&xv)?, get(&wv)?, get(&bv)?])
}

/// Runs every case for every dtype; returns the number of failed cases.
pub fn test(dev: &Device) -> Result<usize> {
    let cpu = Device::Cpu;
    println!("conv: CUDA backend = cuDNN");
    let (mut failed, mut total) = (0, 0);
    for (xs, co, k, s, pad, d, g) in CASES {
        let p = Conv2dParams {
            stride: s,
            padding: pad,
            dilation: d,
            groups: g,
        };
        let x = Tensor::randn(0f32, 1.0, &xs[..], &cpu)?;
        let w = Tensor::randn(0f32, 0.3, (co, xs[1] / g, k, k), &cpu)?;
        let b = Tensor::randn(0f32, 1.0, co, &cpu)?;
        let y_dims = conv2d(&x, &w, None, &p)?.dims().to_vec();
        let r = Tensor::randn(0f32, 1.0, y_dims, &cpu)?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            total += 1;
            let name = format!("conv {dtype:?} x{xs:?} co={co} k={k} {p:?}").to_lowercase();
            let result = (|| -> Result<Vec<(bool, String)>> {
                let t = |t: &Tensor| t.to_dtype(dtype);
                let (xc, wc, bc, rc) = (t(&x)?, t(&w)?, t(&b)?, t(&r)?);
                let want = run(&xc, &wc, &bc, &rc, &p)?;
                let to = |t: &Tensor| t.to_device(dev);
                let got = run(&to(&xc)?, &to(&wc)?, &to(&bc)?, &to(&rc)?, &p)?;
                let mut out = Vec::new();
                for (what, (gt, wt)) in ["y", "dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
                    let c = compare(what, &gt.to_device(&cpu)?, wt, tol(dtype))?;
                    out.push((c.ok, c.msg));
                }
                Ok(out)
            })();
            match result {
                Ok(v) if v.iter().all(|(ok, _)| *ok) => println!("PASS {name}"),
                Ok(v) => {
                    failed += 1;
                    println!("FAIL {name}");
                    for (ok, msg) in &v {
                        println!("     {} {msg}", if *ok { "ok " } else { "BAD" });
                    }
                }
                Err(e) => {
                    failed += 1;
                    println!("FAIL {name}: error {e:#}");
                }
            }
        }
    }
    println!("conv: {} of {total} cases passed", total - failed);
    Ok(failed)
}

/// keel vs candle, forward and forward+backward, JSON lines on stdout.
pub fn bench(dev: &Device, opts: &BenchOpts) -> Result<()> {
    let p = Conv2dParams {
        padding: 1,
        ..Default::default()
    };
    let backend = "cudnn";
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let shapes = if opts.quick {
            &BENCH_SHAPES[..1]
        } else {
            &BENCH_SHAPES[..]
        };
        for s in shapes {
            let c = s[1];
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, &s[..], dev)?.to_dtype(dtype)?)?;
            let w =
                Var::from_tensor(&Tensor::randn(0f32, 0.05, (c, c, 3, 3), dev)?.to_dtype(dtype)?)?;
            let shape = format!("{}x{}x{}x{}", s[0], s[1], s[2], s[3]);
            let dt = format!("{dtype:?}").to_lowercase();
            let emit = |imp: &str, fwd: f64, fb: f64| {
                println!(
                    r#"{{"kind":"conv","impl":"{imp}","backend":"{backend}","dtype":"{dt}","shape":"{shape}","c_out":{c},"fwd_ms":{fwd:.5},"fwdbwd_ms":{fb:.5}}}"#
                );
            };
            let fwd = time_ms(dev, opts, || {
                conv2d(x.as_tensor(), w.as_tensor(), None, &p)?;
                Ok(())
            })?;
            let fb = time_ms(dev, opts, || {
                conv2d(x.as_tensor(), w.as_tensor(), None, &p)?
                    .sum_all()?
                    .backward()?;
                Ok(())
            })?;
            emit("keel", fwd, fb);
            let fwd = time_ms(dev, opts, || {
                x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1)?;
                Ok(())
            })?;
            let fb = time_ms(dev, opts, || {
                x.as_tensor()
                    .conv2d(w.as_tensor(), 1, 1, 1, 1)?
                    .sum_all()?
                    .backward()?;
                Ok(())
            })?;
            emit("candle", fwd, fb);
        }
    }
    Ok(())
}
