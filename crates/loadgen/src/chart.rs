//! The PNG chart: throughput and latency percentiles against load.
//!
//! Text is drawn with plotters' `ab_glyph` backend and DejaVu Sans from the
//! `dejavu` crate, so nothing depends on fonts installed on the machine and
//! the chart renders the same headless as on a desktop.

use std::{path::Path, sync::Once};

use plotters::prelude::*;

use crate::{stats::Percentiles, LoadgenError, RunSummary};

/// One line on the chart: a server or a workload, with one summary per level.
#[derive(Debug, Clone)]
pub struct ChartSeries {
    /// The legend entry.
    pub name: String,
    /// One summary per load level.
    pub runs: Vec<RunSummary>,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // DejaVu Sans is a valid font, so this cannot fail; if it ever did,
        // plotters would report the missing font when drawing text.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

type Metric = fn(&RunSummary) -> Option<f64>;

fn pct(p: Option<&Percentiles>, f: fn(&Percentiles) -> f64) -> Option<f64> {
    p.map(f)
}

/// Draws a 2x2 chart (output tokens/s, TTFT, ITL and E2E p50 and p99 against
/// concurrency or rate, log-scaled) into `path`.
pub fn draw_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[ChartSeries],
) -> Result<(), LoadgenError> {
    register_font();
    let err = |e: String| LoadgenError::Chart {
        path: path.to_path_buf(),
        reason: e,
    };
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let root = root
        .titled(title, ("sans-serif", 26))
        .map_err(|e| err(e.to_string()))?;
    let panels = root.split_evenly((2, 2));
    let specs: [(&str, Metric, Option<Metric>); 4] = [
        ("output tokens/s", |r| Some(r.output_tokens_per_s), None),
        (
            "TTFT ms (line p99, dots p50)",
            |r| pct(r.all.ttft_ms.as_ref(), |p| p.p99),
            Some(|r| pct(r.all.ttft_ms.as_ref(), |p| p.p50)),
        ),
        (
            "inter-token latency ms (line p99, dots p50)",
            |r| pct(r.all.itl_ms.as_ref(), |p| p.p99),
            Some(|r| pct(r.all.itl_ms.as_ref(), |p| p.p50)),
        ),
        (
            "end-to-end ms (line p99, dots p50)",
            |r| pct(r.all.e2e_ms.as_ref(), |p| p.p99),
            Some(|r| pct(r.all.e2e_ms.as_ref(), |p| p.p50)),
        ),
    ];
    for (area, (caption, main, dots)) in panels.iter().zip(specs) {
        draw_panel(area, caption, x_label, series, main, dots).map_err(err)?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    x_label: &str,
    series: &[ChartSeries],
    main: Metric,
    dots: Option<Metric>,
) -> Result<(), String> {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.runs.iter().map(RunSummary::load_value))
        .filter(|x| *x > 0.0)
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.runs.iter())
        .flat_map(|r| [main(r), dots.and_then(|d| d(r))])
        .flatten()
        .filter(|y| y.is_finite())
        .collect();
    let x_min = xs.iter().copied().fold(f64::INFINITY, f64::min).min(1.0);
    let x_max = xs.iter().copied().fold(0.0, f64::max).max(x_min * 2.0);
    let y_max = ys.iter().copied().fold(0.0, f64::max).max(1.0) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x_min * 0.8..x_max * 1.25).log_scale(), 0.0..y_max)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if y_max < 20.0 {
                format!("{y:.1}")
            } else {
                format!("{y:.0}")
            }
        })
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points: Vec<(f64, f64)> = s
            .runs
            .iter()
            .filter_map(|r| Some((r.load_value(), main(r)?)))
            .filter(|(x, _)| *x > 0.0)
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))
            .map_err(|e| e.to_string())?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| e.to_string())?;
        if let Some(d) = dots {
            let small: Vec<(f64, f64)> = s
                .runs
                .iter()
                .filter_map(|r| Some((r.load_value(), d(r)?)))
                .filter(|(x, _)| *x > 0.0)
                .collect();
            chart
                .draw_series(
                    small
                        .iter()
                        .map(|p| Circle::new(*p, 3, color.stroke_width(2))),
                )
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}
