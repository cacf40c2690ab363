//! Borrowing a CPU tensor's elements as a Rust slice without copying.

use tch::{Device, Tensor, kind::Element};

/// Why a tensor cannot be viewed as a slice.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("tensor is on {0:?}, a slice view needs a CPU tensor")]
    NotCpu(Device),
    #[error("tensor has kind {actual:?}, the slice asks for {expected:?}")]
    Kind {
        expected: tch::Kind,
        actual: tch::Kind,
    },
    #[error("tensor is not contiguous")]
    NotContiguous,
    #[error("tensor is undefined")]
    Undefined,
}

/// The elements of a contiguous CPU tensor, borrowed for as long as `t` is.
///
/// Checks device, element kind and contiguity. The caller must not write to the same storage
/// through another handle (a shallow clone, `copy_`, an in-place op) while the slice lives; the
/// project's only caller reads freshly computed results.
pub fn cpu_slice<T: Element>(t: &Tensor) -> Result<&[T], ViewError> {
    if !t.defined() {
        return Err(ViewError::Undefined);
    }
    let device = t.device();
    if device != Device::Cpu {
        return Err(ViewError::NotCpu(device));
    }
    let actual = t.kind();
    if actual != T::KIND {
        return Err(ViewError::Kind {
            expected: T::KIND,
            actual,
        });
    }
    if !t.is_contiguous() {
        return Err(ViewError::NotContiguous);
    }
    let n = t.numel();
    if n == 0 {
        return Ok(&[]);
    }
    let ptr = t.data_ptr() as *const T;
    // SAFETY: the tensor is defined, on the CPU, contiguous, holds `n` elements of kind `T::KIND`
    // (whose Rust type is `T`), and its storage outlives the borrow of `t`; libtorch allocates CPU
    // storage with at least 64-byte alignment. Aliasing writes are excluded by the documented contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
}
