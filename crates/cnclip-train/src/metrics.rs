//! Run logs: one JSON line per training step or validation (flushed as written, so a crash loses
//! nothing already logged), cn_clip's human-readable training line, and loss/recall curves as PNG.

use crate::trainer::StepReport;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// One line of the metrics file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Train {
        step: u64,
        epoch: u64,
        lr: f64,
        loss: f64,
        image_to_text_accuracy: f64,
        text_to_image_accuracy: f64,
        logit_scale: f64,
    },
    Valid {
        step: u64,
        epoch: u64,
        loss: f64,
        /// MUGE recall in percent (cn_clip's evaluation.py scale), when computed.
        r1: Option<f64>,
        r5: Option<f64>,
        r10: Option<f64>,
        mean_recall: Option<f64>,
    },
}

impl Record {
    pub fn train(report: &StepReport, epoch: u64) -> Self {
        Record::Train {
            step: report.step,
            epoch,
            lr: report.lr,
            loss: report.loss,
            image_to_text_accuracy: report.image_to_text_accuracy,
            text_to_image_accuracy: report.text_to_image_accuracy,
            logit_scale: report.logit_scale,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: not a metrics record: {source}")]
    Parse {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("cannot draw {path}: {what}")]
    Plot { path: PathBuf, what: String },
}

/// Appends records to a JSONL file.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for appending (a resumed run continues the same file).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, MetricsError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| MetricsError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        Ok(Self { path, file })
    }

    pub fn write(&mut self, record: &Record) -> Result<(), MetricsError> {
        let mut line = serde_json::to_string(record).map_err(|e| MetricsError::Io {
            path: self.path.clone(),
            source: e.into(),
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| MetricsError::Io {
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads a metrics file back; errors name the line.
pub fn read_records(path: &Path) -> Result<Vec<Record>, MetricsError> {
    let file = File::open(path).map_err(|source| MetricsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut records = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| MetricsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|source| MetricsError::Parse {
            path: path.to_path_buf(),
            line: index + 1,
            source,
        })?;
        records.push(record);
    }
    Ok(records)
}

/// cn_clip's training log line (`train.py:269-286`), accuracy fields only with
/// `--report-training-batch-acc`.
pub fn cn_clip_train_line(s: &crate::observe::StepEvent, report_accuracy: bool) -> String {
    let accum = s.accum_freq.max(1);
    let groups_done = s.batches_into_epoch / accum;
    let steps_per_epoch = (s.batches_per_epoch / accum).max(1);
    let accuracy = if report_accuracy {
        format!(
            "Image2Text Acc: {:.2} | Text2Image Acc: {:.2} | ",
            s.report.image_to_text_accuracy * 100.0,
            s.report.text_to_image_accuracy * 100.0
        )
    } else {
        String::new()
    };
    format!(
        "Global Steps: {}/{} | Train Epoch: {} [{}/{} ({:.0}%)] | Loss: {:.6} | {accuracy}Data Time: {:.3}s | Batch Time: {:.3}s | LR: {:.6} | logit_scale: {:.3} | Global Batch Size: {}",
        s.report.step,
        s.total_steps,
        s.epoch + 1,
        groups_done * s.global_batch,
        s.padded_len,
        100.0 * groups_done as f64 / steps_per_epoch as f64,
        s.report.loss,
        s.data_time,
        s.batch_time,
        s.report.lr,
        s.report.logit_scale,
        s.global_batch
    )
}

/// cn_clip's validation line (`train.py:397-404`) followed by the MUGE recall it does not compute.
pub fn cn_clip_validation_line(e: &crate::observe::ValidationEvent) -> String {
    let v = &e.validation;
    format!(
        "Validation Result (epoch {} @ {} steps) | Valid Loss: {:.6} | Image2Text Acc: {:.2} | Text2Image Acc: {:.2} | logit_scale: {:.3} | Valid Batch Size: {} | Recall@1/5/10: {:.2}/{:.2}/{:.2} | Mean Recall: {:.2}",
        e.epoch + 1,
        e.step,
        v.loss,
        v.image_to_text_accuracy * 100.0,
        v.text_to_image_accuracy * 100.0,
        e.logit_scale,
        e.last_batch_size,
        v.score.r1,
        v.score.r5,
        v.score.r10,
        v.score.mean_recall
    )
}

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

    fn report(step: u64, loss: f64) -> StepReport {
        StepReport {
            step,
            lr: 5e-4 * step as f64,
            loss,
            image_to_text_accuracy: 0.25,
            text_to_image_accuracy: 0.5,
            logit_scale: 4.4929,
            skipped: false,
        }
    }

    #[test]
    fn line_matches_cn_clip_format() {
        // cn_clip's example line (spec §6.12) with 2 ranks × batch 512, step 1 of epoch 1.
        let event = crate::observe::StepEvent {
            report: report(1, 3.554692506790161),
            epoch: 0,
            batches_into_epoch: 1,
            batches_per_epoch: 245,
            accum_freq: 1,
            padded_len: 250_880,
            total_steps: 735,
            global_batch: 1024,
            data_time: 1.039,
            batch_time: 3.625,
        };
        assert_eq!(
            cn_clip_train_line(&event, true),
            "Global Steps: 1/735 | Train Epoch: 1 [1024/250880 (0%)] | Loss: 3.554693 | Image2Text Acc: 25.00 | Text2Image Acc: 50.00 | Data Time: 1.039s | Batch Time: 3.625s | LR: 0.000500 | logit_scale: 4.493 | Global Batch Size: 1024"
        );
        assert!(!cn_clip_train_line(&event, false).contains("Acc"));
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

    #[test]
    fn records_round_trip_and_plot() {
        let dir = std::env::temp_dir().join(format!("cnclip-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("metrics.jsonl");
        let mut log = MetricsLog::open(&path).unwrap();
        let mut written = Vec::new();
        for step in 1..=20 {
            written.push(Record::train(&report(step, 4.0 / step as f64), 0));
        }
        written.push(Record::Valid {
            step: 20,
            epoch: 0,
            loss: 0.5,
            r1: Some(30.0),
            r5: Some(60.0),
            r10: Some(70.0),
            mean_recall: Some(53.3),
        });
        for r in &written {
            log.write(r).unwrap();
        }
        drop(log);
        // Appending after a restart keeps what was there.
        MetricsLog::open(&path).unwrap().write(&written[0]).unwrap();
        let read = read_records(&path).unwrap();
        assert_eq!(read.len(), written.len() + 1);
        assert_eq!(&read[..written.len()], &written[..]);

        let png = dir.join("curves.png");
        plot_curves(&read, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(
            bytes.len() > 5_000,
            "suspiciously small plot: {} bytes",
            bytes.len()
        );

        // A run with one validation only, at its last step, draws too.
        plot_curves(&read[..], &dir.join("one.png")).unwrap();

        std::fs::write(&path, "{\"kind\":\"train\"}\n").unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl line 1"), "{err}");
    }
}
