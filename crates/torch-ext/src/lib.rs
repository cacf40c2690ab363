//! The one place for glue to libtorch that tch does not provide.
//!
//! Today: loading the CUDA half of libtorch ([`init_cuda`]), the `auto|cpu|cuda|cuda:N` device
//! syntax every command line of the project shares ([`DeviceSpec`]), and autocast regions for any
//! device and dtype ([`autocast`], a small C++ shim compiled against libtorch's headers). Process
//! groups over libtorch's c10d (Gloo, NCCL) and CUDA streams land here as their issues need them,
//! so that C++ and `unsafe` stay out of the model, data and training crates.
//!
//! Depends on tch only; every crate that touches a device may depend on it.

mod adamw;
mod autocast;
mod cuda;
mod device;
mod view;

pub use adamw::{AdamWStep, ForeachError, adamw_foreach};
pub use autocast::{AutocastError, autocast, autocast_state};
pub use cuda::{cuda_init_error, init_cuda};
pub use device::{DeviceError, DeviceSpec, parse_device};
pub use view::{ViewError, cpu_slice};
