//! Run logs: one JSON line per training step or validation (flushed as written, so a crash loses
//! nothing already logged) and cn_clip's human-readable training line. The loss/recall curves as
//! PNG are the `plot` module's (feature `plot`).

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A step's report with fixed accuracies and logit scale (also for `observe`'s tests).
    pub(crate) fn report(step: u64, loss: f64) -> StepReport {
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
    fn records_round_trip() {
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

        std::fs::write(&path, "{\"kind\":\"train\"}\n").unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl line 1"), "{err}");
    }
}
