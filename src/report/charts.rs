//! The report's charts: one bar chart per metric (a bar per run) and the training
//! loss curves, drawn with plotters to SVG and PNG.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::train::plot::register_font;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn plot_error<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {error:?}")
}

/// Draws one bar per (run name, value) on any plotters backend.
fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    bars: &[(String, f64)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    register_font();
    root.fill(&WHITE).map_err(plot_error)?;
    let top = bars.iter().map(|b| b.1).fold(0.0f64, f64::max);
    let bottom = bars.iter().map(|b| b.1).fold(0.0f64, f64::min);
    let top = if top <= bottom {
        bottom + 1.0
    } else {
        top * 1.12
    };
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let count = bars.len() as f64;
    // Runs sit at x = 0, 1, 2, ...; each bar is 0.6 wide and labelled by its run name.
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..count - 0.5, bottom..top)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let index = x.round();
            if (x - index).abs() < 1e-6 && index >= 0.0 {
                names.get(index as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_error)?;
    let label_style = ("sans-serif", 14).into_font().into_text_style(&root).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Bottom,
        ),
    );
    for (index, (_, value)) in bars.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let x = index as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x - 0.3, 0.0), (x + 0.3, *value)],
                color.filled(),
            )))
            .map_err(plot_error)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{value:.3}"),
                (x, *value),
                label_style.clone(),
            )))
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Writes DIR/NAME.svg and DIR/NAME.png for one metric. DIR is inside the report's
/// temp folder (see `report::write_report`), so the files are written in place.
pub fn write_bar_chart(dir: &Path, name: &str, title: &str, bars: &[(String, f64)]) -> Result<()> {
    let svg = dir.join(format!("{name}.svg"));
    draw_bars(
        SVGBackend::new(&svg, (640, 400)).into_drawing_area(),
        title,
        bars,
    )?;
    let png = dir.join(format!("{name}.png"));
    draw_bars(
        BitMapBackend::new(&png, (640, 400)).into_drawing_area(),
        title,
        bars,
    )?;
    Ok(())
}

/// Writes DIR/loss.svg and DIR/loss.png from several training logs (in place, as above).
pub fn write_loss_chart(dir: &Path, curves: &[crate::train::plot::Curve]) -> Result<()> {
    use crate::train::plot::draw_curves;
    let svg = dir.join("loss.svg");
    draw_curves(
        SVGBackend::new(&svg, (800, 480)).into_drawing_area(),
        "training loss",
        "optimizer step",
        curves,
    )?;
    let png = dir.join("loss.png");
    draw_curves(
        BitMapBackend::new(&png, (800, 480)).into_drawing_area(),
        "training loss",
        "optimizer step",
        curves,
    )?;
    Ok(())
}
