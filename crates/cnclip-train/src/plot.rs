//! Loss/recall curves of a metrics file as PNG (plotters, with an embedded DejaVu font). Behind
//! the `plot` feature (on by default) so that a crate using the training loop without curves does
//! not compile plotters and the font.

use crate::metrics::{MetricsError, Record};
use std::path::Path;

/// Points of one quantity by step; a run resumed from an earlier checkpoint logs some steps twice,
/// and the later record wins.
fn series(records: &[Record], pick: impl Fn(&Record) -> Option<(u64, f64)>) -> Vec<(u64, f64)> {
    let latest: std::collections::BTreeMap<u64, f64> = records
        .iter()
        .filter_map(pick)
        .filter(|p| p.1.is_finite())
        .collect();
    latest.into_iter().collect()
}

/// The step axis: from 0 to a little past the last step, so a point drawn at the last step (a
/// single validation, say) shows whole instead of cut by the plot's edge.
pub fn step_axis(last_step: u64) -> std::ops::Range<u64> {
    0..last_step + (last_step / 25).max(1)
}

/// A value axis around the data (not from 0: a loss falling from 4.2 to 3.9 must not be a flat line
/// at the top), padded by 5 % of the span each side; a constant series gets a span of its own size.
pub fn value_axis(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    let span = if hi > lo {
        hi - lo
    } else {
        hi.abs().max(1e-12)
    };
    (lo - 0.05 * span)..(hi + 0.05 * span)
}

/// Steps as integers, other values with as many decimals as their axis needs (no `10.0`), very
/// small or large ones (learning rates) in scientific notation.
pub fn value_label(v: f64, axis: &std::ops::Range<f64>) -> String {
    let span = axis.end - axis.start;
    let magnitude = axis.end.abs().max(axis.start.abs());
    if v == 0.0 {
        return "0".into();
    }
    if !(1e-2..1e5).contains(&magnitude) {
        return format!("{v:.1e}");
    }
    let decimals = if span >= 10.0 {
        0
    } else {
        (1.0 - span.log10().floor()).clamp(0.0, 6.0) as usize
    };
    format!("{v:.decimals$}")
}

/// Draws what one wants to see after a run, into a PNG of four panels: training loss (raw and a
/// moving average) with validation loss; the learning rate; validation Recall@1/5/10 and their
/// mean; training accuracy (image→text, text→image). Legends sit in a strip above each panel,
/// never over the data.
pub fn plot_curves(records: &[Record], png: &Path) -> Result<(), MetricsError> {
    use plotters::prelude::*;
    let fail = |what: String| MetricsError::Plot {
        path: png.to_path_buf(),
        what,
    };
    let e = |e: &dyn std::fmt::Display| fail(e.to_string());
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| fail("the embedded DejaVu font did not load".into()))?;

    let train = |f: fn(&Record) -> Option<f64>| {
        series(records, |r| match r {
            Record::Train { step, .. } => f(r).map(|v| (*step, v)),
            Record::Valid { .. } => None,
        })
    };
    let valid = |f: fn(&Record) -> Option<f64>| {
        series(records, |r| match r {
            Record::Valid { step, .. } => f(r).map(|v| (*step, v)),
            Record::Train { .. } => None,
        })
    };
    let train_loss = train(|r| match r {
        Record::Train { loss, .. } => Some(*loss),
        _ => None,
    });
    let lr = train(|r| match r {
        Record::Train { lr, .. } => Some(*lr),
        _ => None,
    });
    let i2t = train(|r| match r {
        Record::Train {
            image_to_text_accuracy,
            ..
        } => Some(100.0 * image_to_text_accuracy),
        _ => None,
    });
    let t2i = train(|r| match r {
        Record::Train {
            text_to_image_accuracy,
            ..
        } => Some(100.0 * text_to_image_accuracy),
        _ => None,
    });
    let valid_loss = valid(|r| match r {
        Record::Valid { loss, .. } => Some(*loss),
        _ => None,
    });
    type Labelled<'a> = (&'a str, Vec<(u64, f64)>, RGBColor);
    let recalls: [Labelled; 4] = [
        (
            "R@1",
            valid(|r| match r {
                Record::Valid { r1, .. } => *r1,
                _ => None,
            }),
            RGBColor(230, 159, 0),
        ),
        (
            "R@5",
            valid(|r| match r {
                Record::Valid { r5, .. } => *r5,
                _ => None,
            }),
            RGBColor(0, 158, 115),
        ),
        (
            "R@10",
            valid(|r| match r {
                Record::Valid { r10, .. } => *r10,
                _ => None,
            }),
            RGBColor(86, 180, 233),
        ),
        (
            "mean",
            valid(|r| match r {
                Record::Valid { mean_recall, .. } => *mean_recall,
                _ => None,
            }),
            RGBColor(0, 0, 0),
        ),
    ];
    if train_loss.is_empty() && valid_loss.is_empty() {
        return Err(fail("no finite records to plot".into()));
    }
    let last_step = records
        .iter()
        .map(|r| match r {
            Record::Train { step, .. } | Record::Valid { step, .. } => *step,
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let steps = step_axis(last_step);
    // A moving average over ~1/20 of the run shows the trend through per-batch noise.
    let window = (train_loss.len() / 20).max(1);
    let smooth: Vec<(u64, f64)> = train_loss
        .iter()
        .enumerate()
        .map(|(i, &(step, _))| {
            let from = i.saturating_sub(window - 1);
            let part = &train_loss[from..=i];
            (
                step,
                part.iter().map(|p| p.1).sum::<f64>() / part.len() as f64,
            )
        })
        .collect();

    let blue = RGBColor(0, 114, 178);
    let light_blue = RGBColor(160, 200, 230);
    let red = RGBColor(213, 94, 0);
    let root = BitMapBackend::new(png, (1200, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let panels = root.split_evenly((2, 2));

    // One panel: title and legend in a strip above, the chart below.
    struct Line<'a> {
        label: &'a str,
        points: &'a [(u64, f64)],
        color: RGBColor,
        width: u32,
        dots: bool,
    }
    let draw = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
                title: &str,
                lines: &[Line],
                y: std::ops::Range<f64>,
                empty: &str|
     -> Result<(), MetricsError> {
        let (strip, body) = area.split_vertically(44);
        strip
            .draw(&Text::new(
                title.to_string(),
                (12, 4),
                ("sans-serif", 18).into_font(),
            ))
            .map_err(|x| e(&x))?;
        let mut x = 12;
        for line in lines.iter().filter(|l| !l.points.is_empty()) {
            strip
                .draw(&PathElement::new(
                    vec![(x, 33), (x + 22, 33)],
                    line.color.stroke_width(line.width.max(2)),
                ))
                .map_err(|x| e(&x))?;
            strip
                .draw(&Text::new(
                    line.label.to_string(),
                    (x + 28, 26),
                    ("sans-serif", 14).into_font(),
                ))
                .map_err(|x| e(&x))?;
            x += 40 + 8 * line.label.chars().count() as i32;
        }
        let label_axis = y.clone();
        let mut chart = ChartBuilder::on(&body)
            .margin_left(8)
            .margin_right(18)
            .margin_bottom(6)
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(steps.clone(), y)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_labels(8)
            .y_labels(6)
            .x_label_formatter(&|s| s.to_string())
            .y_label_formatter(&|v| value_label(*v, &label_axis))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|x| e(&x))?;
        if lines.iter().all(|l| l.points.is_empty()) {
            body.draw(&Text::new(
                empty.to_string(),
                (90, 120),
                ("sans-serif", 16)
                    .into_font()
                    .color(&RGBColor(120, 120, 120)),
            ))
            .map_err(|x| e(&x))?;
        }
        for line in lines {
            chart
                .draw_series(LineSeries::new(
                    line.points.iter().copied(),
                    line.color.stroke_width(line.width),
                ))
                .map_err(|x| e(&x))?;
            if line.dots {
                chart
                    .draw_series(
                        line.points
                            .iter()
                            .map(|&p| Circle::new(p, 4, line.color.filled())),
                    )
                    .map_err(|x| e(&x))?;
            }
        }
        Ok(())
    };

    let loss_lines = [
        Line {
            label: "train (per step)",
            points: &train_loss,
            color: light_blue,
            width: 1,
            dots: false,
        },
        Line {
            label: "train (moving average)",
            points: &smooth,
            color: blue,
            width: 2,
            dots: false,
        },
        Line {
            label: "valid",
            points: &valid_loss,
            color: red,
            width: 2,
            dots: true,
        },
    ];
    let loss_axis = value_axis(train_loss.iter().chain(&valid_loss).map(|p| p.1));
    draw(&panels[0], "loss", &loss_lines, loss_axis, "")?;
    let lr_axis = value_axis(lr.iter().map(|p| p.1).chain([0.0]));
    let lr_lines = [Line {
        label: "learning rate",
        points: &lr,
        color: blue,
        width: 2,
        dots: false,
    }];
    draw(&panels[1], "learning rate", &lr_lines, lr_axis, "")?;
    let recall_lines: Vec<Line> = recalls
        .iter()
        .map(|(label, points, color)| Line {
            label,
            points,
            color: *color,
            width: if *label == "mean" { 3 } else { 2 },
            dots: true,
        })
        .collect();
    let recall_axis = {
        let r = value_axis(recalls.iter().flat_map(|(_, p, _)| p.iter().map(|p| p.1)));
        r.start.max(0.0)..r.end.min(100.0).max(r.start.max(0.0) + 1.0)
    };
    draw(
        &panels[2],
        "validation recall (%)",
        &recall_lines,
        recall_axis,
        "no validation recall (run with --val-data)",
    )?;
    let accuracy_lines = [
        Line {
            label: "image→text",
            points: &i2t,
            color: blue,
            width: 1,
            dots: false,
        },
        Line {
            label: "text→image",
            points: &t2i,
            color: red,
            width: 1,
            dots: false,
        },
    ];
    let accuracy_axis = {
        let r = value_axis(i2t.iter().chain(&t2i).map(|p| p.1));
        r.start.max(0.0)..r.end.min(100.0).max(r.start.max(0.0) + 1.0)
    };
    draw(
        &panels[3],
        "training batch accuracy (%)",
        &accuracy_lines,
        accuracy_axis,
        "",
    )?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_run() {
        let dir = std::env::temp_dir().join(format!("cnclip-plot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // 20 training steps with a falling loss and one validation at the last step.
        let mut records: Vec<Record> = (1..=20u64)
            .map(|step| Record::Train {
                step,
                epoch: 0,
                lr: 5e-4 * step as f64,
                loss: 4.0 / step as f64,
                image_to_text_accuracy: 0.25,
                text_to_image_accuracy: 0.5,
                logit_scale: 4.4929,
            })
            .collect();
        records.push(Record::Valid {
            step: 20,
            epoch: 0,
            loss: 0.5,
            r1: Some(30.0),
            r5: Some(60.0),
            r10: Some(70.0),
            mean_recall: Some(53.3),
        });
        let png = dir.join("curves.png");
        plot_curves(&records, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(
            bytes.len() > 5_000,
            "suspiciously small plot: {} bytes",
            bytes.len()
        );
        // A step logged twice (a resumed run) is drawn once, the later record winning.
        records.push(records[3].clone());
        plot_curves(&records, &dir.join("resumed.png")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn axes_fit_the_data() {
        // The last step lies inside the axis, with room for a marker's radius.
        for last in [1, 5, 20, 1000] {
            let axis = step_axis(last);
            assert!(axis.end > last, "{axis:?}");
        }
        // A loss from 4.2 to 3.9 fills the axis instead of starting at 0.
        let axis = value_axis([4.2, 4.0, 3.9].into_iter());
        assert!(axis.start > 3.8 && axis.start < 3.9 && axis.end > 4.2 && axis.end < 4.3);
        assert!(value_axis([f64::NAN, 2.0].into_iter()).contains(&2.0));
        let flat = value_axis([3.0, 3.0].into_iter());
        assert!(flat.start < 3.0 && flat.end > 3.0);
        // Labels: no "10.0" on a wide axis; enough decimals on a narrow one; LRs in e-notation.
        assert_eq!(value_label(10.0, &(0.0..100.0)), "10");
        assert_eq!(value_label(3.95, &(3.9..4.0)), "3.95");
        assert_eq!(value_label(5e-5, &(0.0..1e-4)), "5.0e-5");
    }
}
