//! cn_clip's learning-rate schedule (`cn_clip/training/scheduler.py`): linear warmup to the base
//! rate, then a half cosine to zero at `total_steps`, evaluated in f64 before every optimizer step.

/// The schedule of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    pub base_lr: f64,
    pub warmup: u64,
    pub total_steps: u64,
}

impl CosineSchedule {
    /// The rate for 0-based optimizer step `step`, as cn_clip's `_lr_adjuster(step)` computes it:
    /// `base·(step+1)/warmup` during warmup, then `0.5·(1 + cos(π·e/es))·base` with
    /// `e = step − warmup`, `es = total − warmup`.
    ///
    /// cn_clip divides by zero when `total_steps == warmup` and a step reaches the cosine branch
    /// (numpy gives NaN with a warning); we return the base rate's limit, 0, instead, since
    /// training stops at `total_steps` anyway.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.base_lr * (step + 1) as f64 / self.warmup as f64;
        }
        let elapsed = (step - self.warmup) as f64;
        let span = self.total_steps.saturating_sub(self.warmup) as f64;
        if span == 0.0 {
            return 0.0;
        }
        0.5 * (1.0 + (std::f64::consts::PI * elapsed / span).cos()) * self.base_lr
    }
}

/// `(max_steps, max_epochs)` as cn_clip's `main.py` derives them: with `--max-steps`, epochs are
/// `ceil(max_steps·accum_freq / batches_per_epoch)`; otherwise steps are
/// `(batches_per_epoch / accum_freq)·max_epochs` (integer division: trailing micro-batches that do
/// not fill an accumulation group never train).
pub fn run_length(
    batches_per_epoch: u64,
    accum_freq: u64,
    max_epochs: u64,
    max_steps: Option<u64>,
) -> (u64, u64) {
    let accum_freq = accum_freq.max(1);
    match max_steps {
        Some(steps) => (
            steps,
            (steps * accum_freq).div_ceil(batches_per_epoch.max(1)),
        ),
        None => ((batches_per_epoch / accum_freq) * max_epochs, max_epochs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_shape() {
        let s = CosineSchedule {
            base_lr: 1.0,
            warmup: 4,
            total_steps: 12,
        };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(4), 1.0);
        assert!((s.lr(8) - 0.5).abs() < 1e-15);
        assert!(s.lr(11) > 0.0 && s.lr(11) < 0.05);
        let no_span = CosineSchedule {
            base_lr: 1.0,
            warmup: 3,
            total_steps: 3,
        };
        assert_eq!(no_span.lr(3), 0.0);
    }

    #[test]
    fn run_length_follows_main_py() {
        assert_eq!(run_length(245, 1, 3, None), (735, 3));
        assert_eq!(run_length(10, 3, 2, None), (6, 2));
        assert_eq!(run_length(10, 1, 99, Some(25)), (25, 3));
        assert_eq!(run_length(10, 2, 99, Some(25)), (25, 5));
    }
}
