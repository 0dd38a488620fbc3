//! The synthetic shapes set under a [`ShapesConfig`]: the default renders the images the
//! first version did, a one-shape config renders one shape class per image at the asked
//! size, and bad ranges are named errors.
use keel_data::{Shapes, ShapesConfig};

/// Pixels of classes 1-4 (circle, rectangle, triangle, ring) in each sample's mask.
fn class_pixels(set: &Shapes) -> Vec<[usize; 4]> {
    set.samples()
        .iter()
        .map(|s| {
            let mut c = [0usize; 4];
            for &v in s.mask.as_raw() {
                if (1..=4).contains(&v) {
                    c[v as usize - 1] += 1;
                }
            }
            c
        })
        .collect()
}

/// Measured with `Shapes::generate` before `ShapesConfig` existed (commit 918260b): a
/// change of the default's random stream (say, drawing the shape count as usize instead of
/// i32) changes these.
#[test]
fn the_default_config_renders_the_first_versions_images() -> candle::Result<()> {
    let want = [
        [0, 437, 96, 0],
        [0, 0, 75, 86],
        [639, 0, 0, 424],
        [455, 0, 190, 114],
        [237, 227, 0, 258],
        [0, 627, 0, 0],
        [0, 543, 0, 0],
        [0, 0, 0, 580],
        [0, 808, 0, 202],
        [436, 0, 0, 108],
        [525, 0, 279, 0],
        [0, 0, 0, 480],
    ];
    let seed = 0x7e57_c1a5_0001;
    assert_eq!(class_pixels(&Shapes::generate(12, 64, seed)), want);
    let with = Shapes::generate_with(12, 64, seed, ShapesConfig::default())?;
    assert_eq!(class_pixels(&with), want);
    Ok(())
}

#[test]
fn one_large_shape_per_image() -> candle::Result<()> {
    let cfg = ShapesConfig {
        min_shapes: 1,
        max_shapes: 1,
        min_radius: 0.3,
        max_radius: 0.4,
        ..ShapesConfig::default()
    };
    let size = 48;
    for c in class_pixels(&Shapes::generate_with(40, size, 3, cfg)?) {
        assert_eq!(c.iter().filter(|&&n| n > 0).count(), 1, "{c:?}");
        // A radius of at least 0.3 * 48 = 14.4 px: even a ring clipped by the border
        // (centres lie in 0.1..0.9 of the side) keeps well over 40 pixels.
        let n: usize = c.iter().sum();
        assert!(n > 40, "{c:?}");
    }
    // The default's shapes (radius 0.10-0.25) cover less of the image on average.
    let mean =
        |v: Vec<[usize; 4]>| v.iter().map(|c| c.iter().sum::<usize>()).sum::<usize>() / v.len();
    let small = ShapesConfig {
        min_radius: 0.10,
        max_radius: 0.25,
        ..cfg
    };
    assert!(
        mean(class_pixels(&Shapes::generate_with(40, size, 3, cfg)?))
            > 2 * mean(class_pixels(&Shapes::generate_with(40, size, 3, small)?))
    );
    Ok(())
}

#[test]
fn bad_ranges_are_named() {
    let d = ShapesConfig::default();
    let err = |cfg: ShapesConfig| {
        Shapes::generate_with(1, 16, 0, cfg)
            .err()
            .unwrap()
            .to_string()
    };
    for bad in [
        ShapesConfig { min_shapes: 0, ..d },
        ShapesConfig {
            min_shapes: 3,
            max_shapes: 2,
            ..d
        },
        ShapesConfig {
            max_shapes: 17,
            ..d
        },
    ] {
        assert!(err(bad).contains("shapes per image"), "{}", err(bad));
    }
    for bad in [
        ShapesConfig {
            min_radius: 0.0,
            ..d
        },
        ShapesConfig {
            min_radius: 0.3,
            max_radius: 0.2,
            ..d
        },
        ShapesConfig {
            max_radius: 0.6,
            ..d
        },
        ShapesConfig {
            min_radius: f32::NAN,
            ..d
        },
    ] {
        assert!(
            err(bad).contains("0 < min_radius < max_radius <= 0.5"),
            "{}",
            err(bad)
        );
    }
}
