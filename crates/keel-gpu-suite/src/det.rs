//! Suite `det`: keel-det's ops on CUDA tensors against the same ops on the CPU. The ops are
//! composed from candle ops (box IoU/GIoU matrices, sigmoid focal and GIoU losses with their
//! backward through candle's autograd) or read their inputs to the host (NMS), so this
//! checks candle's CUDA kernels under keel's formulas and keel's device handling: values
//! and gradients within tolerance, NMS indices identical (ties included).

use anyhow::Result;
use candle::{DType, Device, Tensor, Var};
use keel_det::boxes::{box_iou, generalized_box_iou};
use keel_det::losses::{generalized_box_iou_loss, sigmoid_focal_loss, Reduction};
use keel_det::nms::{batched_nms, nms};

use crate::util::{compare, time_ms, BenchOpts, Tol};

fn tol(dtype: DType) -> Tol {
    match dtype {
        DType::F32 => Tol {
            rtol: 1e-5,
            atol: 1e-6,
        },
        _ => Tol {
            rtol: 1e-2,
            atol: 1e-3,
        },
    }
}

/// `n` boxes `(x1, y1, x2, y2)` in a 100x100 image, widths and heights 1-40, seeded by
/// candle's generator on the CPU; coordinates rounded to integers so that NMS sees ties in
/// IoU as well as in scores.
fn boxes(n: usize) -> Result<Tensor> {
    let cpu = Device::Cpu;
    let xy = (Tensor::rand(0f32, 60.0, (n, 2), &cpu)?).round()?;
    let wh = (Tensor::rand(1f32, 40.0, (n, 2), &cpu)?).round()?;
    Ok(Tensor::cat(&[&xy, &(&xy + &wh)?], 1)?)
}

/// One named check: its comparisons, or the error that stopped it.
fn report(name: &str, r: Result<Vec<(bool, String)>>, failed: &mut usize) {
    match r {
        Ok(v) if v.iter().all(|(ok, _)| *ok) => println!("PASS {name}"),
        Ok(v) => {
            *failed += 1;
            println!("FAIL {name}");
            for (ok, msg) in &v {
                println!("     {} {msg}", if *ok { "ok " } else { "BAD" });
            }
        }
        Err(e) => {
            *failed += 1;
            println!("FAIL {name}: error {e:#}");
        }
    }
}

/// `f(inputs) -> (output, grads of the inputs)` on the CPU and on `dev`, compared.
fn check_op(
    dev: &Device,
    dtype: DType,
    inputs: &[Tensor],
    f: &dyn Fn(&[Var]) -> candle::Result<Tensor>,
) -> Result<Vec<(bool, String)>> {
    let run = |d: &Device| -> Result<(Tensor, Vec<Tensor>)> {
        let vars = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(dtype)?.to_device(d)?))
            .collect::<candle::Result<Vec<_>>>()?;
        let y = f(&vars)?;
        let grads = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
        let g = vars
            .iter()
            .map(|v| match grads.get(v) {
                Some(g) => g.to_device(&Device::Cpu),
                None => v.zeros_like()?.to_device(&Device::Cpu),
            })
            .collect::<candle::Result<Vec<_>>>()?;
        Ok((y.to_device(&Device::Cpu)?, g))
    };
    let (want, want_g) = run(&Device::Cpu)?;
    let (got, got_g) = run(dev)?;
    let mut out = vec![compare("value", &got, &want, tol(dtype))?];
    for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
        out.push(compare(&format!("grad {i}"), g, w, tol(dtype))?);
    }
    Ok(out.into_iter().map(|c| (c.ok, c.msg)).collect())
}

/// CUDA vs CPU for every op, f32 and f16 (bf16 for the losses too); NMS indices identical.
pub fn test(dev: &Device) -> Result<usize> {
    let cpu = Device::Cpu;
    let (mut failed, mut total) = (0, 0);
    let (b1, b2) = (boxes(37)?, boxes(53)?);
    for dtype in [DType::F32, DType::F16] {
        let dt = format!("{dtype:?}").to_lowercase();
        total += 2;
        report(
            &format!("det box_iou {dt} 37x53"),
            check_op(dev, dtype, &[b1.clone(), b2.clone()], &|v| {
                box_iou(v[0].as_tensor(), v[1].as_tensor())
            }),
            &mut failed,
        );
        report(
            &format!("det generalized_box_iou {dt} 37x53"),
            check_op(dev, dtype, &[b1.clone(), b2.clone()], &|v| {
                generalized_box_iou(v[0].as_tensor(), v[1].as_tensor())
            }),
            &mut failed,
        );
    }
    let logits = Tensor::randn(0f32, 2.0, (2, 500, 20), &cpu)?;
    let targets = Tensor::rand(0f32, 1.0, (2, 500, 20), &cpu)?
        .ge(0.95)?
        .to_dtype(DType::F32)?;
    let (p, g) = (boxes(64)?, boxes(64)?);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let dt = format!("{dtype:?}").to_lowercase();
        for red in [Reduction::None, Reduction::Sum] {
            total += 1;
            let t = targets.to_dtype(dtype)?;
            report(
                &format!("det sigmoid_focal_loss {dt} 2x500x20 {red:?}").to_lowercase(),
                check_op(dev, dtype, std::slice::from_ref(&logits), &|v| {
                    sigmoid_focal_loss(
                        v[0].as_tensor(),
                        &t.to_device(v[0].device())?,
                        0.25,
                        2.0,
                        red,
                    )
                }),
                &mut failed,
            );
        }
        total += 1;
        report(
            &format!("det generalized_box_iou_loss {dt} 64 mean"),
            check_op(dev, dtype, &[p.clone(), g.clone()], &|v| {
                generalized_box_iou_loss(v[0].as_tensor(), v[1].as_tensor(), Reduction::Mean, 1e-7)
            }),
            &mut failed,
        );
    }
    for n in [50, 2000] {
        total += 1;
        let r = (|| -> Result<Vec<(bool, String)>> {
            let b = boxes(n)?;
            // Scores on a coarse grid: many exact ties, broken by index as torchvision does.
            let s = (Tensor::rand(0f32, 20.0, n, &cpu)?.floor()? / 20.0)?;
            let c = Tensor::rand(0f32, 3.0, n, &cpu)?
                .floor()?
                .to_dtype(DType::U32)?;
            let on = |t: &Tensor| t.to_device(dev);
            let mut out = Vec::new();
            for th in [0.3, 0.5, 0.7] {
                let (want, got) = (nms(&b, &s, th)?, nms(&on(&b)?, &on(&s)?, th)?);
                out.push((
                    want == got,
                    format!(
                        "nms iou {th}: {} kept on the CPU, {} on CUDA",
                        want.len(),
                        got.len()
                    ),
                ));
                let want = batched_nms(&b, &s, &c, th)?;
                let got = batched_nms(&on(&b)?, &on(&s)?, &on(&c)?, th)?;
                out.push((
                    want == got,
                    format!(
                        "batched_nms iou {th}: {} kept on the CPU, {} on CUDA",
                        want.len(),
                        got.len()
                    ),
                ));
            }
            Ok(out)
        })();
        report(
            &format!("det nms/batched_nms {n} boxes (score ties)"),
            r,
            &mut failed,
        );
    }
    println!("det: {} of {total} cases passed", total - failed);
    Ok(failed)
}

/// The detection losses' forward+backward and NMS on CUDA, as JSON lines on stdout.
pub fn bench(dev: &Device, opts: &BenchOpts) -> Result<()> {
    // FCOS at 512x512: P3-P7 hold 5456 locations per image; batch 8, 80 classes.
    let (n, k) = (8 * 5456, 80);
    let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (n, k), dev)?)?;
    let t = Tensor::rand(0f32, 1.0, (n, k), dev)?
        .ge(0.99)?
        .to_dtype(DType::F32)?;
    let fb = time_ms(dev, opts, || {
        sigmoid_focal_loss(x.as_tensor(), &t, 0.25, 2.0, Reduction::Sum)?.backward()?;
        Ok(())
    })?;
    println!(
        r#"{{"kind":"det","op":"sigmoid_focal_loss","impl":"keel","dtype":"f32","shape":"{n}x{k}","fwdbwd_ms":{fb:.5}}}"#
    );
    for m in [1000, 5000] {
        let b = boxes(m)?.to_device(dev)?;
        let s = Tensor::rand(0f32, 1.0, m, dev)?;
        let ms = time_ms(dev, opts, || {
            nms(&b, &s, 0.5)?;
            Ok(())
        })?;
        println!(
            r#"{{"kind":"det","op":"nms","impl":"keel","dtype":"f32","boxes":{m},"ms":{ms:.5}}}"#
        );
    }
    Ok(())
}
