//! ConfusionMatrix against a hand-computed example, the ignore index and bad ids.
use candle::{DType, Device, Tensor};
use keel_train::ConfusionMatrix;

/// 3 classes, 2 images of 2x3. Hand count (row = target, column = pred):
///
/// ```text
///            pred 0  pred 1  pred 2
/// target 0     2       1       0
/// target 1     0       3       1
/// target 2     1       0       2      (+ 2 ignored pixels)
/// ```
/// IoU0 = 2 / (3 + 3 - 2) = 0.5, IoU1 = 3 / (4 + 4 - 3) = 0.6, IoU2 = 2 / (3 + 3 - 2) = 0.5;
/// pixel accuracy = 7 / 10.
fn example(dtype: DType) -> anyhow::Result<(Tensor, Tensor)> {
    let target: [[[u32; 3]; 2]; 2] = [[[0, 0, 0], [1, 1, 1]], [[1, 2, 2], [2, 255, 255]]];
    let pred: [[[u32; 3]; 2]; 2] = [[[0, 0, 1], [1, 1, 2]], [[1, 2, 2], [0, 1, 0]]];
    let dev = &Device::Cpu;
    Ok((
        Tensor::new(&pred, dev)?.to_dtype(dtype)?,
        Tensor::new(&target, dev)?.to_dtype(dtype)?,
    ))
}

#[test]
fn matches_the_hand_computed_example_for_every_id_dtype() -> anyhow::Result<()> {
    for dtype in [DType::U8, DType::U32, DType::I64] {
        let (pred, target) = example(dtype)?;
        let mut cm = ConfusionMatrix::new(3, Some(255))?;
        cm.update(&pred, &target)?;
        assert_eq!(cm.counts(), &[2, 1, 0, 0, 3, 1, 1, 0, 2], "{dtype:?}");
        assert_eq!(cm.iou(), vec![Some(0.5), Some(0.6), Some(0.5)]);
        assert!((cm.miou() - 1.6 / 3.0).abs() < 1e-15);
        assert_eq!(cm.pixel_accuracy(), 0.7);
        assert_eq!(cm.num_classes(), 3);
    }
    Ok(())
}

#[test]
fn batches_accumulate_and_reset_clears() -> anyhow::Result<()> {
    let (pred, target) = example(DType::U32)?;
    let mut whole = ConfusionMatrix::new(3, Some(255))?;
    whole.update(&pred, &target)?;
    let mut parts = ConfusionMatrix::new(3, Some(255))?;
    for i in 0..2 {
        parts.update(&pred.get(i)?, &target.get(i)?)?;
    }
    assert_eq!(whole, parts);
    parts.update(&pred, &target)?;
    assert_eq!(parts.counts().iter().sum::<u64>(), 20);
    parts.reset();
    assert!(parts.counts().iter().all(|&c| c == 0));
    assert_eq!((parts.miou(), parts.pixel_accuracy()), (0.0, 0.0));
    Ok(())
}

#[test]
fn absent_class_has_no_iou_and_is_left_out_of_the_mean() -> anyhow::Result<()> {
    let dev = &Device::Cpu;
    let mut cm = ConfusionMatrix::new(4, None)?;
    // Class 3 never appears; class 2 only as a wrong prediction (IoU 0).
    cm.update(
        &Tensor::new(&[0u8, 1, 2, 1], dev)?,
        &Tensor::new(&[0u8, 1, 1, 1], dev)?,
    )?;
    assert_eq!(cm.iou(), vec![Some(1.0), Some(2.0 / 3.0), Some(0.0), None]);
    assert!((cm.miou() - (1.0 + 2.0 / 3.0) / 3.0).abs() < 1e-15);
    Ok(())
}

#[test]
fn ignored_pixels_are_skipped_even_with_any_prediction() -> anyhow::Result<()> {
    let dev = &Device::Cpu;
    let mut cm = ConfusionMatrix::new(2, Some(255))?;
    // The prediction under an ignored pixel is not checked either.
    cm.update(
        &Tensor::new(&[1u32, 7, 0], dev)?,
        &Tensor::new(&[1u32, 255, 255], dev)?,
    )?;
    assert_eq!(cm.counts(), &[0, 0, 0, 1]);
    Ok(())
}

#[test]
fn bad_ids_are_errors_naming_the_value_and_leave_the_matrix_unchanged() -> anyhow::Result<()> {
    let dev = &Device::Cpu;
    let mut cm = ConfusionMatrix::new(3, Some(255))?;
    cm.update(&Tensor::new(&[0u8], dev)?, &Tensor::new(&[0u8], dev)?)?;
    let before = cm.clone();

    let e = cm
        .update(&Tensor::new(&[0u8, 1], dev)?, &Tensor::new(&[0u8, 7], dev)?)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("target class id 7") && e.contains("ignore index 255"),
        "{e}"
    );

    let e = cm
        .update(&Tensor::new(&[0u8, 3], dev)?, &Tensor::new(&[0u8, 1], dev)?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("predicted class id 3"), "{e}");

    let e = cm
        .update(&Tensor::new(&[0i64], dev)?, &Tensor::new(&[-1i64], dev)?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("target class id -1"), "{e}");

    // Without an ignore index, 255 is just an out-of-range id.
    let mut strict = ConfusionMatrix::new(3, None)?;
    let e = strict
        .update(&Tensor::new(&[0u8], dev)?, &Tensor::new(&[255u8], dev)?)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("target class id 255") && e.contains("no ignore index"),
        "{e}"
    );
    assert_eq!(cm, before);
    Ok(())
}

#[test]
fn shape_and_dtype_errors() -> anyhow::Result<()> {
    let dev = &Device::Cpu;
    let mut cm = ConfusionMatrix::new(3, None)?;
    let e = cm
        .update(
            &Tensor::zeros((2, 3), DType::U8, dev)?,
            &Tensor::zeros((3, 2), DType::U8, dev)?,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
    let e = cm
        .update(
            &Tensor::zeros(4, DType::F32, dev)?,
            &Tensor::zeros(4, DType::U8, dev)?,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pred") && e.contains("F32") && e.contains("argmax"),
        "{e}"
    );
    assert!(ConfusionMatrix::new(0, None).is_err());
    Ok(())
}
