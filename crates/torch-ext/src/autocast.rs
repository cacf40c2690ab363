//! Autocast regions for any device and dtype (tch's `autocast` only covers CUDA fp16): bf16 mixed
//! precision on GPUs, and on CPUs with AVX512-BF16/AMX.

use tch::{Device, Kind};

unsafe extern "C" {
    fn cnclip_autocast_set(device: i32, enabled: i32, dtype: i32) -> i32;
    fn cnclip_autocast_is_enabled(device: i32) -> i32;
    fn cnclip_autocast_dtype(device: i32) -> i32;
    fn cnclip_autocast_increment_nesting() -> i32;
    fn cnclip_autocast_decrement_nesting() -> i32;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AutocastError {
    #[error("autocast supports Half and BFloat16, not {0:?}")]
    Dtype(Kind),
    #[error("libtorch refused to change the autocast state of {0:?}")]
    Torch(Device),
}

fn device_code(device: Device) -> i32 {
    if device.is_cuda() { 1 } else { 0 }
}

fn dtype_code(kind: Kind) -> Result<i32, AutocastError> {
    match kind {
        Kind::Half => Ok(0),
        Kind::BFloat16 => Ok(1),
        other => Err(AutocastError::Dtype(other)),
    }
}

fn kind_of(code: i32) -> Kind {
    if code == 1 {
        Kind::BFloat16
    } else {
        Kind::Half
    }
}

/// Runs `f` with autocast to `dtype` enabled for `device`'s type, restoring the previous state
/// afterwards (also when `enabled` is false, which runs `f` with autocast off, like Python's
/// `autocast(enabled=False)`).
pub fn autocast<T>(
    device: Device,
    dtype: Kind,
    enabled: bool,
    f: impl FnOnce() -> T,
) -> Result<T, AutocastError> {
    let code = device_code(device);
    let wanted = dtype_code(dtype)?;
    // SAFETY: the shim functions only read/write libtorch's thread-local autocast state and catch
    // every C++ exception; the codes passed are the ones the shim defines.
    let (was_enabled, was_dtype) = unsafe {
        (
            cnclip_autocast_is_enabled(code),
            cnclip_autocast_dtype(code),
        )
    };
    if was_enabled < 0 || was_dtype < 0 {
        return Err(AutocastError::Torch(device));
    }
    // SAFETY: as above.
    if unsafe { cnclip_autocast_set(code, i32::from(enabled), wanted) } != 0 {
        return Err(AutocastError::Torch(device));
    }
    // SAFETY: as above; nesting is balanced by the decrement below.
    unsafe { cnclip_autocast_increment_nesting() };
    let restore = Restore {
        code,
        enabled: was_enabled,
        dtype: if was_dtype <= 1 { was_dtype } else { wanted },
    };
    let out = f();
    drop(restore);
    Ok(out)
}

/// Puts the previous state back even if `f` panics.
struct Restore {
    code: i32,
    enabled: i32,
    dtype: i32,
}

impl Drop for Restore {
    fn drop(&mut self) {
        // SAFETY: see `autocast`.
        unsafe {
            cnclip_autocast_decrement_nesting();
            cnclip_autocast_set(self.code, self.enabled, self.dtype);
        }
    }
}

/// Whether autocast is on for `device`'s type, and to which dtype.
pub fn autocast_state(device: Device) -> Option<(bool, Kind)> {
    let code = device_code(device);
    // SAFETY: see `autocast`.
    let (enabled, dtype) = unsafe {
        (
            cnclip_autocast_is_enabled(code),
            cnclip_autocast_dtype(code),
        )
    };
    (enabled >= 0 && dtype >= 0).then(|| (enabled == 1, kind_of(dtype)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn cpu_bf16_autocast_casts_matmuls_and_restores_state() {
        let before = autocast_state(Device::Cpu).unwrap();
        let a = Tensor::randn([8, 8], (Kind::Float, Device::Cpu));
        let inside = autocast(Device::Cpu, Kind::BFloat16, true, || {
            assert_eq!(autocast_state(Device::Cpu), Some((true, Kind::BFloat16)));
            a.matmul(&a).kind()
        })
        .unwrap();
        assert_eq!(inside, Kind::BFloat16);
        assert_eq!(a.matmul(&a).kind(), Kind::Float);
        assert_eq!(autocast_state(Device::Cpu), Some(before));

        // Nested: an inner disabled region runs in fp32, the outer state comes back after it.
        autocast(Device::Cpu, Kind::BFloat16, true, || {
            let inner =
                autocast(Device::Cpu, Kind::BFloat16, false, || a.matmul(&a).kind()).unwrap();
            assert_eq!(inner, Kind::Float);
            assert_eq!(a.matmul(&a).kind(), Kind::BFloat16);
        })
        .unwrap();
    }

    #[test]
    fn only_half_and_bf16() {
        assert_eq!(
            autocast(Device::Cpu, Kind::Float, true, || ()),
            Err(AutocastError::Dtype(Kind::Float))
        );
    }
}
