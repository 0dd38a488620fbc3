//! one-off timing (not committed)
fn main() {
    let n = 500;
    let t = std::time::Instant::now();
    let mut objs = 0;
    for i in 0..n {
        objs += keel_data::DetShapes::render(128, 1, i).boxes.len();
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
    println!("DetShapes 128x128: {ms:.3} ms/sample, {:.2} objects/sample", objs as f64 / n as f64);
}
