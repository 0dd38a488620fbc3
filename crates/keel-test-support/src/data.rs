//! Deterministic test inputs without a random-number crate.

/// `len` pseudo-random values in `offset ± scale` from a xorshift64 generator seeded by
/// `seed`: the same values on every platform and run.
///
/// ```
/// use keel_test_support::xorshift_data;
/// let v = xorshift_data(1000, 7, 2.0, 10.0);
/// assert_eq!(v, xorshift_data(1000, 7, 2.0, 10.0));
/// assert!(v.iter().all(|x| (8.0..=12.0).contains(x)));
/// assert_ne!(v, xorshift_data(1000, 8, 2.0, 10.0));
/// ```
pub fn xorshift_data(len: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            offset + scale * (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}
