//! Bench plots: one grouped bar chart per backend, median latency per op
//! (log scale) for each workload and target, written as SVG and PNG.
//!
//! Text needs a TrueType font; plotters is built without system font
//! lookup, so a DejaVu font from the system (Debian's fonts-dejavu-core,
//! installed by `cargo xtask setup`) is registered at run time.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One bar.
#[derive(Clone, Debug)]
pub struct Point {
    /// Chart (backend).
    pub group: String,
    /// X category (workload).
    pub category: String,
    /// Bar within the category (target).
    pub series: String,
    /// Height: median latency in µs.
    pub value_us: f64,
}

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> anyhow::Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let path = FONT_PATHS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| "no DejaVuSans.ttf found (apt-get install fonts-dejavu-core)".to_string())?;
        let bytes: &'static [u8] =
            Box::leak(std::fs::read(path).map_err(|e| e.to_string())?.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a usable font"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    pts: &[&Point],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let mut cats: Vec<&str> = Vec::new();
    let mut series: Vec<&str> = Vec::new();
    for p in pts {
        if !cats.contains(&p.category.as_str()) {
            cats.push(&p.category);
        }
        if !series.contains(&p.series.as_str()) {
            series.push(&p.series);
        }
    }
    let vals: BTreeMap<(&str, &str), f64> = pts
        .iter()
        .map(|p| ((p.category.as_str(), p.series.as_str()), p.value_us))
        .collect();
    let max = vals.values().cloned().fold(1.0, f64::max) * 3.0;
    let min = vals.values().cloned().fold(f64::MAX, f64::min).max(0.01) / 3.0;
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..cats.len() as f64, (min..max).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(cats.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 && i < cats.len() {
                cats[i].to_string()
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 14))
        .y_desc("median latency per op (µs, log)")
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    for (si, s) in series.iter().enumerate() {
        let color = Palette99::pick(si).to_rgba();
        let bars: Vec<Rectangle<(f64, f64)>> = cats
            .iter()
            .enumerate()
            .filter_map(|(ci, c)| {
                let v = *vals.get(&(*c, *s))?;
                let x0 = ci as f64 + 0.1 + si as f64 * width;
                Some(Rectangle::new([(x0, min), (x0 + width, v)], color.filled()))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(*s)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Write `latency-<group>.svg` and `.png` into `out`; returns the file names.
pub fn plots(points: &[Point], out: &Path) -> anyhow::Result<Vec<String>> {
    register_font().context("plots need a TrueType font")?;
    if points.is_empty() {
        bail!("nothing to plot");
    }
    let mut groups: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
    for p in points {
        groups.entry(&p.group).or_default().push(p);
    }
    let mut files = Vec::new();
    for (g, pts) in groups {
        let title = format!("efuse bench, backend {g}: median latency per op");
        let svg = out.join(format!("latency-{g}.svg"));
        draw(
            SVGBackend::new(&svg, (1400, 800)).into_drawing_area(),
            &title,
            &pts,
        )?;
        let png = out.join(format!("latency-{g}.png"));
        draw(
            BitMapBackend::new(&png, (1400, 800)).into_drawing_area(),
            &title,
            &pts,
        )?;
        files.push(svg.display().to_string());
        files.push(png.display().to_string());
    }
    Ok(files)
}
