//! The semantics of `assert_close`: the limit `max(rtol * |want|, atol)` at its edge,
//! non-finite values, shapes, the message, and the returned measurements.

use candle::{DType, Device, Tensor};
use keel_test_support::{assert_close, check_close, Mismatch, Tol};

#[test]
fn limit_is_the_max_of_relative_and_absolute() {
    let tol = Tol::new(1e-2, 1e-3);
    // |want| = 10: the relative part (0.1) is the limit; 0.09 passes, 0.11 fails.
    assert!(check_close("rel in", &[10.09], &[10.0], tol).is_ok());
    assert!(check_close("rel out", &[10.11], &[10.0], tol).is_err());
    // |want| = 0.01: the absolute part (1e-3) is the limit, not the sum 1.1e-3.
    assert!(check_close("abs in", &[0.0109], &[0.01], tol).is_ok());
    assert!(check_close("abs out", &[0.01105], &[0.01], tol).is_err());
    // Relative to |want|, not |got|: want 1, got 2 is out at rtol 0.6 although 1 <= 0.6 * 2.
    assert!(check_close("want side", &[2.0], &[1.0], Tol::new(0.6, 0.0)).is_err());
    // Exactly at the limit passes (<=).
    assert!(check_close("edge", &[1.5], &[1.0], Tol::new(0.5, 0.0)).is_ok());
}

#[test]
fn returns_the_max_abs_and_rel_error() {
    let got = [1.0, 2.5, -3.0, 0.001];
    let want = [1.0, 2.0, -3.25, 0.0];
    let err = assert_close("errors", &got, &want, Tol::new(0.25, 0.01));
    assert_eq!(err, 0.5);
    let c = check_close("errors", &got, &want, Tol::new(0.25, 0.01)).unwrap();
    assert_eq!((c.len, c.max_abs, c.max_rel), (4, 0.5, 0.25));
}

#[test]
#[should_panic(expected = "one wrong value: 1 of 4 elements outside")]
fn a_wrong_value_fails() {
    assert_close(
        "one wrong value",
        &[1.0f32, 2.0, 3.0, 4.0],
        &[1.0f32, 2.0, 3.001, 4.0],
        Tol::F32,
    );
}

#[test]
#[should_panic(expected = "shape [2, 3] != expected [3, 2]")]
fn a_shape_mismatch_fails() {
    let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    assert_close("shapes", &a, &b, Tol::EXACT);
}

#[test]
fn the_message_names_the_worst_element_by_its_multi_dim_index() {
    let want = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
    // Two failures; [1, 1] is 10x its limit, [0, 2] only 2x.
    let got = Tensor::new(&[[1f32, 2.0, 3.2], [4.0, 6.0, 6.0]], &Device::Cpu).unwrap();
    let e = check_close("y", &got, &want, Tol::new(0.0, 0.1)).unwrap_err();
    match &e {
        Mismatch::Values {
            failures,
            len,
            index,
            got,
            want,
            max_abs,
            ..
        } => {
            assert_eq!((*failures, *len), (2, 6));
            assert_eq!(index, &[1, 1]);
            assert_eq!((*got, *want, *max_abs), (6.0, 5.0, 1.0));
        }
        other => panic!("expected a value mismatch, got {other:?}"),
    }
    let msg = e.to_string();
    for part in [
        "y: 2 of 6",
        "worst at [1, 1]",
        "got 6e0",
        "want 5e0",
        "atol 1e-1",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg:?}");
    }
}

#[test]
fn non_finite_values_must_match_exactly() {
    let (nan, inf) = (f64::NAN, f64::INFINITY);
    let loose = Tol::new(1e9, 1e9);
    assert!(check_close("nan nan", &[nan], &[nan], Tol::EXACT).is_ok());
    assert!(check_close("inf inf", &[inf, -inf], &[inf, -inf], Tol::EXACT).is_ok());
    // Even an enormous tolerance does not accept a non-finite mismatch.
    for (g, w) in [
        (nan, 1.0),
        (1.0, nan),
        (inf, 1.0),
        (1.0, inf),
        (inf, -inf),
        (nan, inf),
    ] {
        let e = check_close("mismatch", &[g], &[w], loose);
        assert!(e.is_err(), "got {g} want {w} passed");
    }
}

#[test]
fn tensors_and_slices_of_any_float_dtype_compare() {
    let dev = Device::Cpu;
    let t = Tensor::new(&[0.5f32, -1.25, 3.0], &dev).unwrap();
    for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        let tt = t.to_dtype(dtype).unwrap();
        assert_eq!(
            assert_close("vs slice", &tt, &[0.5, -1.25, 3.0], Tol::EXACT),
            0.0
        );
        assert_eq!(
            assert_close("vs tensor", &tt, &t, Tol::for_dtype(dtype)),
            0.0
        );
    }
    // Non-contiguous tensors are read in their logical order.
    let m = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)
        .unwrap()
        .t()
        .unwrap();
    assert_close(
        "transposed",
        &m.flatten_all().unwrap(),
        &vec![1f32, 3.0, 2.0, 4.0],
        Tol::EXACT,
    );
    // Integers compare exactly through the same path.
    assert_close(
        "ints",
        &[1u32, 2, 3],
        &[1.0, 2.0, 3.0],
        Tol::for_dtype(DType::U32),
    );
}

#[test]
fn presets_order_from_strict_to_loose() {
    let presets = [Tol::EXACT, Tol::F64, Tol::F32, Tol::F16, Tol::BF16];
    for w in presets.windows(2) {
        assert!(w[0].rtol < w[1].rtol && w[0].atol <= w[1].atol, "{w:?}");
    }
    assert_eq!(Tol::F16.scale_atol(4.0), Tol::new(4e-3, 1.6e-2));
    assert_eq!(Tol::F32.with_atol(5e-3), Tol::new(1e-4, 5e-3));
    assert_eq!(Tol::for_dtype(DType::F32), Tol::F32);
}

#[test]
#[should_panic(expected = "no preset for F8E4M3")]
fn eight_bit_floats_have_no_preset() {
    Tol::for_dtype(DType::F8E4M3);
}
