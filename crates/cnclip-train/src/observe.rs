//! What a run tells its caller, and the caller's way to stop it: the [`Observer`] trait. The run
//! itself never prints; cn_clip's log lines ([`CnClipLog`]), the JSONL metrics ([`JsonlMetrics`]),
//! the curves ([`Curves`]) and the terminal progress bars ([`ProgressBars`]) are observers a caller
//! attaches, replaces or leaves out. Only rank 0 of a data-parallel run calls its observers.

use crate::checkpoint::RunPosition;
use crate::metrics::{self, MetricsLog, Record};
use crate::trainer::StepReport;
use crate::validate::Validation;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Whether the run goes on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Control {
    #[default]
    Continue,
    /// Stop after this step: the run writes `epoch_latest` (so it can be continued) and returns.
    Stop,
}

/// An observer failed (a log file could not be written, …).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ObserverError(pub String);

impl From<metrics::MetricsError> for ObserverError {
    fn from(e: metrics::MetricsError) -> Self {
        Self(e.to_string())
    }
}

/// The shape of a run, sent once before its first step.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStart {
    pub total_steps: u64,
    pub max_epochs: u64,
    /// Micro-batches per epoch and process.
    pub batches_per_epoch: u64,
    /// The data set padded to whole global batches (cn_clip's `dataset_len`).
    pub padded_len: u64,
    /// Rows per optimizer step over all processes (batch · accum-freq · world).
    pub global_batch: u64,
    pub world_size: u64,
    /// Where the run starts (non-zero when it resumes).
    pub position: RunPosition,
    pub run_dir: Option<PathBuf>,
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEvent {
    pub report: StepReport,
    /// 0-based epoch.
    pub epoch: u64,
    /// Micro-batches of this epoch done, this step's included.
    pub batches_into_epoch: u64,
    pub batches_per_epoch: u64,
    /// Micro-batches per optimizer step.
    pub accum_freq: u64,
    pub padded_len: u64,
    pub total_steps: u64,
    pub global_batch: u64,
    /// Seconds spent waiting for data during this step, and the step's wall time.
    pub data_time: f64,
    pub batch_time: f64,
}

/// A finished validation pass.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationEvent {
    pub epoch: u64,
    pub step: u64,
    pub validation: Validation,
    pub logit_scale: f64,
    /// Rows of the last validation batch (cn_clip logs it as "Valid Batch Size").
    pub last_batch_size: u64,
}

/// A checkpoint written.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointEvent {
    pub stem: String,
    /// The model file (`{stem}.safetensors`).
    pub path: PathBuf,
    pub position: RunPosition,
    pub seconds: f64,
}

/// Receives a run's events; every method defaults to doing nothing.
pub trait Observer {
    fn on_start(&mut self, _start: &RunStart) -> Result<(), ObserverError> {
        Ok(())
    }
    fn on_step(&mut self, _step: &StepEvent) -> Result<Control, ObserverError> {
        Ok(Control::Continue)
    }
    /// A validation pass begins over `batches` batches; `on_validation_batch` follows each.
    fn on_validation_start(&mut self, _batches: u64) -> Result<(), ObserverError> {
        Ok(())
    }
    fn on_validation_batch(&mut self, _done: u64) -> Result<(), ObserverError> {
        Ok(())
    }
    fn on_validation(&mut self, _event: &ValidationEvent) -> Result<Control, ObserverError> {
        Ok(Control::Continue)
    }
    fn on_checkpoint(&mut self, _event: &CheckpointEvent) -> Result<(), ObserverError> {
        Ok(())
    }
    /// The run ended (finished or stopped) at `position`.
    fn on_finish(&mut self, _position: &RunPosition) -> Result<(), ObserverError> {
        Ok(())
    }
}

/// No observation.
impl Observer for () {}

impl<O: Observer + ?Sized> Observer for &mut O {
    fn on_start(&mut self, s: &RunStart) -> Result<(), ObserverError> {
        (**self).on_start(s)
    }
    fn on_step(&mut self, s: &StepEvent) -> Result<Control, ObserverError> {
        (**self).on_step(s)
    }
    fn on_validation_start(&mut self, b: u64) -> Result<(), ObserverError> {
        (**self).on_validation_start(b)
    }
    fn on_validation_batch(&mut self, d: u64) -> Result<(), ObserverError> {
        (**self).on_validation_batch(d)
    }
    fn on_validation(&mut self, e: &ValidationEvent) -> Result<Control, ObserverError> {
        (**self).on_validation(e)
    }
    fn on_checkpoint(&mut self, e: &CheckpointEvent) -> Result<(), ObserverError> {
        (**self).on_checkpoint(e)
    }
    fn on_finish(&mut self, p: &RunPosition) -> Result<(), ObserverError> {
        (**self).on_finish(p)
    }
}

/// Several observers, called in order; the run stops when any of them asks.
#[derive(Default)]
pub struct Observers<'a>(pub Vec<Box<dyn Observer + 'a>>);

impl<'a> Observers<'a> {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn with(mut self, observer: impl Observer + 'a) -> Self {
        self.0.push(Box::new(observer));
        self
    }

    pub fn push(&mut self, observer: impl Observer + 'a) {
        self.0.push(Box::new(observer));
    }
}

fn any_stop(
    controls: impl Iterator<Item = Result<Control, ObserverError>>,
) -> Result<Control, ObserverError> {
    let mut out = Control::Continue;
    for c in controls {
        if c? == Control::Stop {
            out = Control::Stop;
        }
    }
    Ok(out)
}

impl Observer for Observers<'_> {
    fn on_start(&mut self, s: &RunStart) -> Result<(), ObserverError> {
        self.0.iter_mut().try_for_each(|o| o.on_start(s))
    }
    fn on_step(&mut self, s: &StepEvent) -> Result<Control, ObserverError> {
        let controls: Vec<_> = self.0.iter_mut().map(|o| o.on_step(s)).collect();
        any_stop(controls.into_iter())
    }
    fn on_validation_start(&mut self, b: u64) -> Result<(), ObserverError> {
        self.0.iter_mut().try_for_each(|o| o.on_validation_start(b))
    }
    fn on_validation_batch(&mut self, d: u64) -> Result<(), ObserverError> {
        self.0.iter_mut().try_for_each(|o| o.on_validation_batch(d))
    }
    fn on_validation(&mut self, e: &ValidationEvent) -> Result<Control, ObserverError> {
        let controls: Vec<_> = self.0.iter_mut().map(|o| o.on_validation(e)).collect();
        any_stop(controls.into_iter())
    }
    fn on_checkpoint(&mut self, e: &CheckpointEvent) -> Result<(), ObserverError> {
        self.0.iter_mut().try_for_each(|o| o.on_checkpoint(e))
    }
    fn on_finish(&mut self, p: &RunPosition) -> Result<(), ObserverError> {
        self.0.iter_mut().try_for_each(|o| o.on_finish(p))
    }
}

/// cn_clip's log (`logger.py`): `time | INFO | Rank 0 | message` lines to any writer (stdout,
/// `out_{time}.log`): the training line every `log_interval` steps, validation results and saved
/// checkpoints.
pub struct CnClipLog<W: Write> {
    out: W,
    log_interval: u64,
    report_accuracy: bool,
}

impl<W: Write> CnClipLog<W> {
    pub fn new(out: W, log_interval: u64, report_accuracy: bool) -> Self {
        Self {
            out,
            log_interval: log_interval.max(1),
            report_accuracy,
        }
    }

    fn line(&mut self, message: &str) -> Result<(), ObserverError> {
        writeln!(self.out, "{}", log_prefix(message))
            .and_then(|()| self.out.flush())
            .map_err(|e| ObserverError(format!("cannot write the training log: {e}")))
    }
}

/// `2022-12-11,20:40:34 | INFO | Rank 0 | message` (cn_clip's format; the time in UTC).
pub fn log_prefix(message: &str) -> String {
    format!(
        "{} | INFO | Rank 0 | {message}",
        utc_now("%Y-%m-%d,%H:%M:%S")
    )
}

/// The current UTC time as `YYYY-MM-DD,HH:MM:SS` (`"%Y-%m-%d,%H:%M:%S"`) or
/// `YYYY-MM-DD-HH-MM-SS` (any other pattern: cn_clip's file-name suffix).
pub fn utc_now(pattern: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if pattern == "%Y-%m-%d,%H:%M:%S" {
        format!("{y:04}-{m:02}-{d:02},{h:02}:{mi:02}:{s:02}")
    } else {
        format!("{y:04}-{m:02}-{d:02}-{h:02}-{mi:02}-{s:02}")
    }
}

impl<W: Write> Observer for CnClipLog<W> {
    fn on_step(&mut self, s: &StepEvent) -> Result<Control, ObserverError> {
        if s.report.step.is_multiple_of(self.log_interval) {
            let line = cn_clip_train_line(s, self.report_accuracy);
            self.line(&line)?;
        }
        Ok(Control::Continue)
    }
    fn on_validation(&mut self, e: &ValidationEvent) -> Result<Control, ObserverError> {
        let line = cn_clip_validation_line(e);
        self.line(&line)?;
        Ok(Control::Continue)
    }
    fn on_checkpoint(&mut self, e: &CheckpointEvent) -> Result<(), ObserverError> {
        let line = format!(
            "Saved checkpoint {} (epoch {} @ {} steps) (writing took {:.3} seconds)",
            e.path.display(),
            e.position.epoch + 1,
            e.position.step,
            e.seconds
        );
        self.line(&line)
    }
}

/// One JSON line per step and validation (`metrics.jsonl`, appended: a resumed run continues it).
pub struct JsonlMetrics {
    log: MetricsLog,
}

impl JsonlMetrics {
    pub fn open(path: &Path) -> Result<Self, metrics::MetricsError> {
        Ok(Self {
            log: MetricsLog::open(path)?,
        })
    }
}

impl Observer for JsonlMetrics {
    fn on_step(&mut self, s: &StepEvent) -> Result<Control, ObserverError> {
        self.log.write(&Record::train(&s.report, s.epoch))?;
        Ok(Control::Continue)
    }
    fn on_validation(&mut self, e: &ValidationEvent) -> Result<Control, ObserverError> {
        let v = &e.validation;
        self.log.write(&Record::Valid {
            step: e.step,
            epoch: e.epoch,
            loss: v.loss,
            r1: Some(v.score.r1),
            r5: Some(v.score.r5),
            r10: Some(v.score.r10),
            mean_recall: Some(v.score.mean_recall),
        })?;
        Ok(Control::Continue)
    }
}

/// Draws the loss/recall curves of a metrics file as PNG when the run ends (feature `plot`).
#[cfg(feature = "plot")]
pub struct Curves {
    pub metrics: PathBuf,
    pub png: PathBuf,
}

#[cfg(feature = "plot")]
impl Observer for Curves {
    fn on_finish(&mut self, _position: &RunPosition) -> Result<(), ObserverError> {
        if !self.metrics.is_file() {
            return Ok(());
        }
        let records = metrics::read_records(&self.metrics)?;
        if !records.is_empty() {
            crate::plot::plot_curves(&records, &self.png)?;
        }
        Ok(())
    }
}

/// Progress bars with ETA over the run's steps and over each validation pass (indicatif, on
/// stderr); cn_clip's lines are printed above them every `log_interval` steps. Feature `progress`.
#[cfg(feature = "progress")]
pub struct ProgressBars {
    steps: indicatif::ProgressBar,
    valid: Option<indicatif::ProgressBar>,
    multi: indicatif::MultiProgress,
    log_interval: u64,
    report_accuracy: bool,
}

#[cfg(feature = "progress")]
impl ProgressBars {
    pub fn new(log_interval: u64, report_accuracy: bool) -> Self {
        let multi = indicatif::MultiProgress::new();
        let steps = multi.add(indicatif::ProgressBar::new(0));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix} {wide_bar} {pos}/{len} steps ({eta} left) {msg}",
        ) {
            steps.set_style(style);
        }
        steps.set_prefix("train");
        Self {
            steps,
            valid: None,
            multi,
            log_interval: log_interval.max(1),
            report_accuracy,
        }
    }

    fn println(&self, line: &str) {
        let _ = self.multi.println(log_prefix(line));
    }
}

#[cfg(feature = "progress")]
impl Observer for ProgressBars {
    fn on_start(&mut self, s: &RunStart) -> Result<(), ObserverError> {
        self.steps.set_length(s.total_steps);
        self.steps.set_position(s.position.step);
        self.steps.reset_eta();
        Ok(())
    }
    fn on_step(&mut self, s: &StepEvent) -> Result<Control, ObserverError> {
        self.steps.set_position(s.report.step);
        self.steps.set_message(format!(
            "epoch {} loss {:.4} lr {:.2e}",
            s.epoch + 1,
            s.report.loss,
            s.report.lr
        ));
        if s.report.step.is_multiple_of(self.log_interval) {
            self.println(&cn_clip_train_line(s, self.report_accuracy));
        }
        Ok(Control::Continue)
    }
    fn on_validation_start(&mut self, batches: u64) -> Result<(), ObserverError> {
        let bar = self.multi.add(indicatif::ProgressBar::new(batches));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{prefix} {wide_bar} {pos}/{len} batches ({eta} left)",
        ) {
            bar.set_style(style);
        }
        bar.set_prefix("valid");
        self.valid = Some(bar);
        Ok(())
    }
    fn on_validation_batch(&mut self, done: u64) -> Result<(), ObserverError> {
        if let Some(bar) = &self.valid {
            bar.set_position(done);
        }
        Ok(())
    }
    fn on_validation(&mut self, e: &ValidationEvent) -> Result<Control, ObserverError> {
        if let Some(bar) = self.valid.take() {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
        self.println(&cn_clip_validation_line(e));
        Ok(Control::Continue)
    }
    fn on_checkpoint(&mut self, e: &CheckpointEvent) -> Result<(), ObserverError> {
        self.println(&format!(
            "Saved checkpoint {} (epoch {} @ {} steps)",
            e.path.display(),
            e.position.epoch + 1,
            e.position.step
        ));
        Ok(())
    }
    fn on_finish(&mut self, _position: &RunPosition) -> Result<(), ObserverError> {
        self.steps.finish();
        Ok(())
    }
}

/// Stops the run after `steps` optimizer steps of this process (a library caller's early stop).
#[derive(Debug, Clone, Copy)]
pub struct StopAfter(pub u64);

impl Observer for StopAfter {
    fn on_step(&mut self, s: &StepEvent) -> Result<Control, ObserverError> {
        Ok(if s.report.step >= self.0 {
            Control::Stop
        } else {
            Control::Continue
        })
    }
}

/// cn_clip's training log line (`train.py:269-286`), accuracy fields only with
/// `--report-training-batch-acc`.
pub fn cn_clip_train_line(s: &StepEvent, report_accuracy: bool) -> String {
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
pub fn cn_clip_validation_line(e: &ValidationEvent) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::report;

    #[test]
    fn line_matches_cn_clip_format() {
        // cn_clip's line format (`train.py:269-286`) with 2 ranks × batch 512, step 1 of epoch 1.
        let event = StepEvent {
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
    fn utc_format_has_cn_clip_shape() {
        let t = utc_now("%Y-%m-%d,%H:%M:%S");
        assert_eq!(t.len(), 19, "{t}");
        assert_eq!(&t[10..11], ",");
        let f = utc_now("file");
        assert_eq!(f.matches('-').count(), 5, "{f}");
    }
}
