//! The one place for glue to libtorch that tch does not provide.
//!
//! Today: loading the CUDA half of libtorch ([`init_cuda`]), the `auto|cpu|cuda|cuda:N` device
//! syntax every command line of the project shares ([`DeviceSpec`]), autocast regions for any
//! device and dtype ([`autocast`], a small C++ shim compiled against libtorch's headers), and
//! libtorch's own c10d — TCPStore rendezvous, Gloo and NCCL process groups ([`dist`]). C++ and
//! `unsafe` stay here, out of the model, data and training crates.
//!
//! Depends on tch only; every crate that touches a device may depend on it.

mod adamw;
mod autocast;
mod cuda;
mod device;
pub mod dist;
pub mod reducer;
pub mod sync_bn;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod test_support;
mod view;

pub use adamw::{AdamWStep, ForeachError, adamw_foreach, adamw_single};
pub use autocast::{AutocastError, autocast, autocast_state};
pub use cuda::{cuda_init_error, init_cuda};
pub use device::{DeviceError, DeviceSpec, parse_device};
pub use view::{ViewError, cpu_slice};
