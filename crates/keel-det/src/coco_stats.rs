//! What [`crate::coco_eval::CocoEval`] reports: pycocotools' 12 summary numbers (and the
//! text `summarize()` prints) and per-class AP. Re-exported from `coco_eval`.

use std::fmt;

/// The 12 numbers of pycocotools' `COCOeval.summarize()` for boxes. Each is `-1` when no
/// category has ground truth in its area range (as pycocotools prints).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CocoStats {
    /// AP @[.50:.95], all areas, 100 detections (the COCO mAP).
    pub ap: f64,
    /// AP @.50.
    pub ap50: f64,
    /// AP @.75.
    pub ap75: f64,
    /// AP @[.50:.95], small objects.
    pub ap_small: f64,
    /// AP @[.50:.95], medium objects.
    pub ap_medium: f64,
    /// AP @[.50:.95], large objects.
    pub ap_large: f64,
    /// AR @[.50:.95] with 1 detection per image.
    pub ar1: f64,
    /// AR with 10 detections per image.
    pub ar10: f64,
    /// AR with 100 detections per image.
    pub ar100: f64,
    /// AR, small objects.
    pub ar_small: f64,
    /// AR, medium objects.
    pub ar_medium: f64,
    /// AR, large objects.
    pub ar_large: f64,
}

impl CocoStats {
    /// Names of [`CocoStats::to_array`]'s entries, in pycocotools' order.
    pub const NAMES: [&'static str; 12] = [
        "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
    ];

    /// pycocotools' `stats` array.
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }
}

/// The 12 lines pycocotools' `summarize()` prints, character for character:
/// ` Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.291`.
impl fmt::Display for CocoStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const IOU: [&str; 12] = [
            "0.50:0.95",
            "0.50",
            "0.75",
            "0.50:0.95",
            "0.50:0.95",
            "0.50:0.95",
            "0.50:0.95",
            "0.50:0.95",
            "0.50:0.95",
            "0.50:0.95",
            "0.50:0.95",
            "0.50:0.95",
        ];
        const AREA: [&str; 12] = [
            "all", "all", "all", "small", "medium", "large", "all", "all", "all", "small",
            "medium", "large",
        ];
        const MAX_DET: [usize; 12] = [100, 100, 100, 100, 100, 100, 1, 10, 100, 100, 100, 100];
        for (i, v) in self.to_array().into_iter().enumerate() {
            let (title, kind) = if i < 6 {
                ("Average Precision", "(AP)")
            } else {
                ("Average Recall", "(AR)")
            };
            writeln!(
                f,
                " {title:<18} {kind} @[ IoU={:<9} | area={:>6} | maxDets={:>3} ] = {v:.3}",
                IOU[i], AREA[i], MAX_DET[i]
            )?;
        }
        Ok(())
    }
}

/// AP of one category (all areas, 100 detections per image); `None` without ground truth.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassAp {
    /// The category id.
    pub category_id: u64,
    /// The category name.
    pub name: String,
    /// AP @[.50:.95].
    pub ap: Option<f64>,
    /// AP @.50.
    pub ap50: Option<f64>,
}
