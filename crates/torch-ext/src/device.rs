//! The device syntax shared by every command line: `auto`, `cpu`, `cuda`, `cuda:N`.

use std::fmt;
use std::str::FromStr;
use tch::Device;

/// A device as the user wrote it, before it is checked against the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first GPU when CUDA works, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// `cuda` is `cuda:0`.
    Cuda(usize),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error(
        "invalid device {given:?}: expected auto, cpu, cuda or cuda:N (N a GPU index such as 0)"
    )]
    Invalid { given: String },
    #[error("device {requested} was requested but CUDA is unavailable: {reason}")]
    CudaUnavailable { requested: String, reason: String },
    #[error("device cuda:{index} was requested but this machine has {count} GPU(s) (valid: cuda:0..cuda:{last})", last = count.saturating_sub(1))]
    NoSuchGpu { index: usize, count: usize },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || DeviceError::Invalid {
            given: s.to_string(),
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => {
                let index = other.strip_prefix("cuda:").ok_or_else(invalid)?;
                if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid());
                }
                index.parse().map(DeviceSpec::Cuda).map_err(|_| invalid())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// The tch device this spec means on this machine, loading CUDA first when a GPU may be used.
    pub fn resolve(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => Ok(if crate::init_cuda() {
                Device::Cuda(0)
            } else {
                Device::Cpu
            }),
            DeviceSpec::Cuda(index) => {
                if !crate::init_cuda() {
                    return Err(DeviceError::CudaUnavailable {
                        requested: self.to_string(),
                        reason: crate::cuda_init_error().unwrap_or_default(),
                    });
                }
                let count = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
                if index >= count {
                    return Err(DeviceError::NoSuchGpu { index, count });
                }
                Ok(Device::Cuda(index))
            }
        }
    }
}

/// Parses and resolves a device string in one step, for command lines.
pub fn parse_device(s: &str) -> Result<Device, DeviceError> {
    s.parse::<DeviceSpec>()?.resolve()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse(), Ok(DeviceSpec::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("CPU".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:0".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!(" cuda:12 ".parse(), Ok(DeviceSpec::Cuda(12)));
    }

    #[test]
    fn rejects_malformed_forms_with_the_syntax() {
        for bad in [
            "",
            "gpu0",
            "cuda:",
            "cuda:-1",
            "cuda:+1",
            "cuda:x",
            "cuda:1:2",
            "mps",
            "cuda0",
            "cuda:99999999999999999999999",
        ] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert_eq!(
                err,
                DeviceError::Invalid {
                    given: bad.to_string()
                }
            );
            assert!(
                err.to_string()
                    .contains("expected auto, cpu, cuda or cuda:N"),
                "{err}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for spec in [
            DeviceSpec::Auto,
            DeviceSpec::Cpu,
            DeviceSpec::Cuda(0),
            DeviceSpec::Cuda(7),
        ] {
            assert_eq!(spec.to_string().parse(), Ok(spec));
        }
    }

    #[test]
    fn resolves_against_this_machine() {
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        if crate::init_cuda() {
            assert_eq!(parse_device("auto"), Ok(Device::Cuda(0)));
            assert_eq!(parse_device("cuda"), Ok(Device::Cuda(0)));
            let count = usize::try_from(tch::Cuda::device_count()).unwrap();
            assert_eq!(
                parse_device(&format!("cuda:{count}")),
                Err(DeviceError::NoSuchGpu {
                    index: count,
                    count
                })
            );
        } else {
            assert_eq!(parse_device("auto"), Ok(Device::Cpu));
            let err = parse_device("cuda:1").unwrap_err();
            assert!(
                matches!(err, DeviceError::CudaUnavailable { .. }),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("cuda:1") && msg.contains("libtorch_cuda.so"),
                "{msg}"
            );
        }
    }
}
