//! Training curves as a PNG (feature `plot`, plotters' bitmap backend): a grid of panels,
//! each a set of labelled line curves over a shared x range (steps). Text (titles, axes,
//! legends) needs a TTF font; without one on the system the chart is drawn without text.
use std::ops::Range;
use std::path::Path;

use plotters::prelude::*;

/// The line colours, by [`Curve::colour`] modulo their count (matplotlib's first five).
pub const PALETTE: [(u8, u8, u8); 5] = [
    (214, 39, 40),
    (31, 119, 180),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
];

/// One line: its legend label, a [`PALETTE`] index and its `(x, y)` points.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curve {
    /// Legend text.
    pub label: String,
    /// Index into [`PALETTE`] (wraps around).
    pub colour: usize,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// One chart of the grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    /// Caption above the chart.
    pub title: String,
    /// The y axis range.
    pub y: Range<f64>,
    /// The lines.
    pub curves: Vec<Curve>,
}

/// A grid of panels, filled row by row.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// The panels; their count is a multiple of `columns` (a short last row stays empty).
    pub panels: Vec<Panel>,
    /// Panels per row (at least 1).
    pub columns: usize,
    /// The x axis of every panel: `0..x_max`.
    pub x_max: f64,
    /// The x axis label.
    pub x_label: String,
    /// Pixels of one panel (width, height).
    pub panel_size: (u32, u32),
}

/// Registers a TTF font for the charts' text, if the system has one (plotters draws text
/// with ab_glyph); whether one was found.
fn register_font() -> bool {
    const CANDIDATES: [&str; 4] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ];
    for p in CANDIDATES {
        if let Ok(bytes) = std::fs::read(p) {
            // plotters keeps the font for the process: one leak per registration.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Draws `fig` into the PNG file `path`.
pub fn plot(path: &Path, fig: &Figure) -> candle::Result<()> {
    let fail =
        |e: &dyn std::fmt::Display| candle::Error::Msg(format!("plot {}: {e}", path.display()));
    if fig.columns == 0 || fig.panels.is_empty() {
        candle::bail!(
            "plot {}: the figure needs at least one panel and one column (got {} panels, {} columns)",
            path.display(),
            fig.panels.len(),
            fig.columns
        )
    }
    let text = register_font();
    let rows = fig.panels.len().div_ceil(fig.columns);
    let (w, h) = fig.panel_size;
    let size = (w * fig.columns as u32, h * rows as u32);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let areas = root.split_evenly((rows, fig.columns));
    for (panel, area) in fig.panels.iter().zip(&areas) {
        draw_panel(area, panel, fig, text).map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult<'a> =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>>;

/// One panel: caption, mesh (or a bare frame without a font), lines and legend.
fn draw_panel<'a>(area: &Area<'a>, panel: &Panel, fig: &Figure, text: bool) -> DrawResult<'a> {
    let mut builder = ChartBuilder::on(area);
    builder.margin(10);
    if text {
        builder
            .caption(&panel.title, ("sans-serif", 18))
            .x_label_area_size(28)
            .y_label_area_size(48);
    }
    let mut chart = builder.build_cartesian_2d(0.0..fig.x_max, panel.y.clone())?;
    if text {
        chart
            .configure_mesh()
            .x_desc(fig.x_label.as_str())
            // x is a count (steps): integer tick labels, not "200.0".
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(WHITE)
            .draw()?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0)
            .draw()?;
    }
    for c in &panel.curves {
        let (r, g, b) = PALETTE[c.colour % PALETTE.len()];
        let colour = RGBColor(r, g, b);
        let series =
            chart.draw_series(LineSeries::new(c.points.clone(), colour.stroke_width(2)))?;
        if text {
            series.label(c.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_and_rejects_an_empty_figure() -> candle::Result<()> {
        let dir = std::env::temp_dir().join(format!("keel-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("curves.png");
        let curve = |colour| Curve {
            label: format!("run {colour}"),
            colour,
            points: (0..10)
                .map(|i| (i as f64, (i * colour) as f64 / 50.0))
                .collect(),
        };
        let panel = |title: &str| Panel {
            title: title.into(),
            y: 0.0..1.0,
            curves: vec![curve(1), curve(7)],
        };
        let mut fig = Figure {
            panels: vec![panel("loss"), panel("mIoU"), panel("loss 2")],
            columns: 2,
            x_max: 10.0,
            x_label: "step".into(),
            panel_size: (200, 100),
        };
        plot(&path, &fig)?;
        let bytes = std::fs::read(&path)?;
        assert_eq!(&bytes[1..4], b"PNG");
        // Width 2 x 200, height 2 rows x 100 (PNG IHDR: big-endian u32s at 16 and 20).
        assert_eq!(&bytes[16..24], &[0, 0, 1, 144, 0, 0, 0, 200]);
        fig.panels.clear();
        let err = plot(&path, &fig).unwrap_err().to_string();
        assert!(err.contains("at least one panel"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }
}
