//! Fused GroupNorm+SiLU vs candle-nn's composed GroupNorm + SiLU on CPU, f32, forward and
//! forward+backward (loss `sum(y * dy)`, `.backward()`), at the shapes. `floor` is
//! the same loss and backward on x itself without GroupNorm: candle's autograd cost that
//! every forward+backward row includes. Before the timings it prints the peak heap allocated
//! by one call of each (a counting global allocator).
//!
//! The fused rows run once per instruction set this CPU supports (`fused/base`,
//! `fused/avx2`, `fused/avx512`, chosen with `keel_kernels::set_cpu_isa`, which overrides
//! `KEEL_CPU_ISA` for those rows), so the levels are compared side by side in one run.
//!
//! `cargo bench -p keel-kernels --bench group_norm` (`-- fused` for the fused rows only)

use candle::{Device, Module, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use keel_kernels::{cpu_isa, set_cpu_isa, CpuIsa};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Counts live heap bytes and their peak.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to `System` with the caller's layout; the counters are only
// statistics and never influence allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (see `alloc`).
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const SHAPES: [(usize, usize, usize, usize); 3] =
    [(2, 64, 64, 64), (8, 128, 64, 64), (1, 256, 128, 128)];
const GROUPS: usize = 32;
const EPS: f64 = 1e-5;

struct Inputs {
    x: Var,
    w: Var,
    b: Var,
    dy: Tensor,
}

fn inputs(shape: (usize, usize, usize, usize)) -> candle::Result<Inputs> {
    let dev = Device::Cpu;
    let c = shape.1;
    Ok(Inputs {
        x: Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?)?,
        w: Var::from_tensor(&(Tensor::randn(0f32, 0.5, c, &dev)? + 1.0)?)?,
        b: Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev)?)?,
        dy: Tensor::randn(0f32, 1.0, shape, &dev)?,
    })
}

fn fused_fwd(i: &Inputs) -> candle::Result<Tensor> {
    keel_kernels::group_norm_silu(
        i.x.as_tensor(),
        i.w.as_tensor(),
        i.b.as_tensor(),
        GROUPS,
        EPS,
    )
}

fn candle_fwd(i: &Inputs) -> candle::Result<Tensor> {
    let c = i.w.dims()[0];
    let gn = candle_nn::GroupNorm::new(
        i.w.as_tensor().clone(),
        i.b.as_tensor().clone(),
        c,
        GROUPS,
        EPS,
    )?;
    candle_nn::ops::silu(&gn.forward(i.x.as_tensor())?)
}

/// The autograd cost around the op: the same loss on x itself, no GroupNorm.
fn loss_floor(i: &Inputs) -> candle::Result<Tensor> {
    Ok(i.x.as_tensor().clone())
}

fn fwd_bwd(
    i: &Inputs,
    f: fn(&Inputs) -> candle::Result<Tensor>,
) -> candle::Result<candle::backprop::GradStore> {
    (f(i)? * &i.dy)?.sum_all()?.backward()
}

/// Peak heap bytes above the level at entry while running `f`.
fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed) - base)
}

fn report_memory() -> candle::Result<()> {
    println!("peak heap above the inputs during one call, MiB (x = input size):");
    for shape in SHAPES {
        let i = inputs(shape)?;
        let x_mib = i.x.elem_count() as f64 * 4.0 / (1 << 20) as f64;
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        let (_, f_fwd) = peak_bytes(|| fused_fwd(&i));
        let (_, c_fwd) = peak_bytes(|| candle_fwd(&i));
        let (_, f_fb) = peak_bytes(|| fwd_bwd(&i, fused_fwd));
        let (_, c_fb) = peak_bytes(|| fwd_bwd(&i, candle_fwd));
        let (_, floor) = peak_bytes(|| fwd_bwd(&i, loss_floor));
        println!(
            "  {shape:?} x={x_mib:.1}: fwd fused {:.1} candle {:.1} | fwd+bwd incl. loss sum(y*dy): fused {:.1} candle {:.1} floor (loss on x, no GN) {:.1}",
            mib(f_fwd), mib(c_fwd), mib(f_fb), mib(c_fb), mib(floor)
        );
    }
    Ok(())
}

/// Makes the fused op run `isa` (`None`: back to `KEEL_CPU_ISA` or the best level).
fn use_isa(isa: Option<CpuIsa>) {
    if let Err(e) = set_cpu_isa(isa) {
        panic!("{e}");
    }
}

fn bench(c: &mut Criterion) {
    let isas = CpuIsa::supported();
    let names: Vec<&str> = isas.iter().map(|i| i.name()).collect();
    match cpu_isa() {
        Ok(i) => println!(
            "keel CPU ISA levels benchmarked: {} (the ops' level without an override: {i})",
            names.join(", ")
        ),
        Err(e) => println!("keel CPU ISA levels benchmarked: {}; {e}", names.join(", ")),
    }
    if let Err(e) = report_memory() {
        eprintln!("memory report failed: {e}");
    }
    for shape in SHAPES {
        let i = match inputs(shape) {
            Ok(i) => i,
            Err(e) => panic!("inputs {shape:?}: {e}"),
        };
        let name = format!("{}x{}x{}x{}", shape.0, shape.1, shape.2, shape.3);
        let mut g = c.benchmark_group(format!("gn_silu_fwd/{name}"));
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        for &isa in &isas {
            use_isa(Some(isa));
            g.bench_function(format!("fused/{isa}"), |bch| {
                bch.iter(|| black_box(fused_fwd(&i).map(|_| ())))
            });
        }
        use_isa(None);
        g.bench_function("candle", |bch| {
            bch.iter(|| black_box(candle_fwd(&i).map(|_| ())))
        });
        g.finish();
        let mut g = c.benchmark_group(format!("gn_silu_fwd_bwd/{name}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(4));
        for &isa in &isas {
            use_isa(Some(isa));
            g.bench_function(format!("fused/{isa}"), |bch| {
                bch.iter(|| black_box(fwd_bwd(&i, fused_fwd).map(|_| ())))
            });
        }
        use_isa(None);
        g.bench_function("candle", |bch| {
            bch.iter(|| black_box(fwd_bwd(&i, candle_fwd).map(|_| ())))
        });
        g.bench_function("floor", |bch| {
            bch.iter(|| black_box(fwd_bwd(&i, loss_floor).map(|_| ())))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
