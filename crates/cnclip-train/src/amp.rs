//! Mixed precision as cn_clip's `--precision amp`: fp16 autocast on CUDA with fp32 master weights
//! and a gradient scaler equal to `torch.cuda.amp.GradScaler()` with its defaults (initial scale
//! 2¹⁶, growth ×2 every 2000 clean steps, backoff ×0.5 on overflow, and the optimizer step skipped
//! when any gradient is inf/NaN), built from libtorch's own amp kernels so the arithmetic is
//! torch's.

use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct GradScaler {
    scale: Tensor,
    growth_tracker: Tensor,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: i64,
}

impl GradScaler {
    /// torch's defaults.
    pub fn new(device: Device) -> Self {
        Self::with_scale(device, 65536.0)
    }

    pub fn with_scale(device: Device, init_scale: f64) -> Self {
        Self {
            scale: Tensor::full([1], init_scale, (Kind::Float, device)),
            growth_tracker: Tensor::zeros([1], (Kind::Int, device)),
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }

    /// The current loss scale.
    pub fn scale_value(&self) -> f64 {
        self.scale.double_value(&[0])
    }

    /// `loss · scale`, what `backward` runs on.
    pub fn scale(&self, loss: &Tensor) -> Tensor {
        loss * self.scale.to_kind(loss.kind())
    }

    /// Divides every gradient by the scale in place and tells whether any was inf/NaN
    /// (`GradScaler.unscale_`).
    pub fn unscale(&self, grads: &[Tensor]) -> bool {
        let device = self.scale.device();
        let mut found_inf = Tensor::zeros([1], (Kind::Float, device));
        let inv_scale = self.scale.reciprocal();
        for grad in grads {
            if grad.defined() {
                let mut grad = grad.shallow_clone();
                grad.internal_amp_non_finite_check_and_unscale(&mut found_inf, &inv_scale);
            }
        }
        let overflow = found_inf.double_value(&[0]) != 0.0;
        let mut scale = self.scale.shallow_clone();
        let _ = scale.internal_amp_update_scale_(
            &self.growth_tracker,
            &found_inf,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        );
        overflow
    }

    /// Scale and growth tracker, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        vec![
            ("scaler.scale".to_string(), self.scale.shallow_clone()),
            (
                "scaler.growth_tracker".to_string(),
                self.growth_tracker.shallow_clone(),
            ),
        ]
    }

    pub fn load_state(&mut self, lookup: impl Fn(&str) -> Option<Tensor>) -> bool {
        match (lookup("scaler.scale"), lookup("scaler.growth_tracker")) {
            (Some(scale), Some(tracker)) => {
                let device = self.scale.device();
                self.scale = scale.to_device(device).to_kind(Kind::Float);
                self.growth_tracker = tracker.to_device(device).to_kind(Kind::Int);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_backs_off_and_clean_steps_keep_the_scale() {
        let scaler = GradScaler::with_scale(Device::Cpu, 1024.0);
        let grads = [Tensor::from_slice(&[2048.0f32, -512.0])];
        assert!(!scaler.unscale(&grads));
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), vec![2.0, -0.5]);
        assert_eq!(scaler.scale_value(), 1024.0);

        let poisoned = [Tensor::from_slice(&[1.0f32, f32::INFINITY])];
        assert!(scaler.unscale(&poisoned));
        assert_eq!(scaler.scale_value(), 512.0);
        let nan = [Tensor::from_slice(&[f32::NAN])];
        assert!(scaler.unscale(&nan));
        assert_eq!(scaler.scale_value(), 256.0);
    }

    #[test]
    fn scale_grows_after_the_growth_interval() {
        let mut scaler = GradScaler::with_scale(Device::Cpu, 8.0);
        scaler.growth_interval = 3;
        let grads = [Tensor::from_slice(&[1.0f32])];
        for _ in 0..3 {
            assert!(!scaler.unscale(&[grads[0].copy()]));
        }
        assert_eq!(scaler.scale_value(), 16.0);
    }
}
