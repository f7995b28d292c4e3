//! OUT/loss.svg and OUT/loss.png: training and eval loss against optimizer steps,
//! drawn with plotters. The font is embedded (assets/fonts) so no system font or
//! fontconfig is needed.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::state::LogEntry;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

pub fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One named curve of (step, loss) points.
pub struct Curve {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Draws the curves on any plotters backend.
pub fn draw_curves<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    curves: &[Curve],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    register_font();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let all: Vec<&(f64, f64)> = curves.iter().flat_map(|c| c.points.iter()).collect();
    let (x_min, x_max) = all.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let (y_min, y_max) = all.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let (x_min, x_max) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (x_min, x_max.max(x_min + 1.0))
    };
    let (y_min, y_max) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (y_min, y_max.max(y_min + 1e-6))
    };
    let margin = (y_max - y_min) * 0.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x_min..x_max, (y_min - margin)..(y_max + margin))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (index, curve) in curves.iter().enumerate() {
        let color = colors[index % colors.len()];
        chart
            .draw_series(LineSeries::new(
                curve.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(curve.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                curve
                    .points
                    .iter()
                    .map(|&p| Circle::new(p, 3, color.filled())),
            )
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// The train and eval curves of a log.
pub fn loss_curves(log: &[LogEntry]) -> Vec<Curve> {
    let train: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|e| e.loss.map(|l| (e.step as f64, l)))
        .collect();
    let eval: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|e| e.eval_loss.map(|l| (e.step as f64, l)))
        .collect();
    let mut curves = vec![Curve {
        name: "train loss".into(),
        points: train,
    }];
    if !eval.is_empty() {
        curves.push(Curve {
            name: "eval loss".into(),
            points: eval,
        });
    }
    curves
}

/// Writes OUT/loss.svg and OUT/loss.png (each through a temp file and a rename).
pub fn write_loss_plots(out: &Path, log: &[LogEntry]) -> Result<()> {
    let curves = loss_curves(log);
    let svg_path = out.join("loss.svg");
    let svg_tmp = crate::atomic::temp_path_for(&svg_path);
    draw_curves(
        SVGBackend::new(&svg_tmp, (800, 480)).into_drawing_area(),
        "amthal training",
        "optimizer step",
        &curves,
    )?;
    std::fs::rename(&svg_tmp, &svg_path)?;
    let png_path = out.join("loss.png");
    let png_tmp = crate::atomic::temp_path_for(&png_path).with_extension("png");
    draw_curves(
        BitMapBackend::new(&png_tmp, (800, 480)).into_drawing_area(),
        "amthal training",
        "optimizer step",
        &curves,
    )?;
    std::fs::rename(&png_tmp, &png_path)?;
    Ok(())
}
