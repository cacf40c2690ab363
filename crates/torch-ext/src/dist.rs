//! Distributed collectives on PyTorch's own c10d: a TCPStore rendezvous and a Gloo (always) or NCCL
//! (cargo feature `nccl`) process group, with the four collectives data-parallel training needs.
//!
//! We write no transport: these are libtorch's `TCPStore`, `ProcessGroupGloo` and
//! `ProcessGroupNCCL`, the very objects `torch.distributed` drives, reached through a small C++
//! shim (`c10d.cpp`). Every call blocks until the collective has completed (Gloo) or is enqueued on
//! the current CUDA stream (NCCL) and turns libtorch's exceptions — a peer that died, a rendezvous
//! or collective past its timeout — into [`DistError`]s; nothing can hang longer than the timeout
//! given at construction.
//!
//! NCCL and the CPU-built binaries: the `nccl` feature links `libtorch_cuda`/`libc10_cuda`
//! directly, because `ProcessGroupNCCL` is a C++ class whose constructor lives there. A binary
//! built with it therefore needs a CUDA torch at run time (the GPU machines' torch, found through
//! the second rpath entry), while the default build keeps reaching CUDA by `dlopen` only
//! ([`crate::init_cuda`]) and runs on the minimal CPU install.

use std::ffi::{CStr, CString, c_char};
use std::time::Duration;
use tch::Tensor;

#[repr(C)]
struct RawStore {
    _private: [u8; 0],
}

#[repr(C)]
struct RawGroup {
    _private: [u8; 0],
}

type TensorPtr = *mut torch_sys::C_tensor;

unsafe extern "C" {
    fn cnclip_c10d_free_error(message: *mut c_char);
    fn cnclip_c10d_has_nccl() -> i32;
    fn cnclip_c10d_tcp_store(
        host: *const c_char,
        port: u16,
        world_size: i64,
        is_server: i32,
        timeout_ms: i64,
        out: *mut *mut RawStore,
    ) -> *mut c_char;
    fn cnclip_c10d_store_free(store: *mut RawStore);
    fn cnclip_c10d_gloo(
        store: *mut RawStore,
        prefix: *const c_char,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        hostname: *const c_char,
        interface: *const c_char,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn cnclip_c10d_nccl(
        store: *mut RawStore,
        prefix: *const c_char,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        out: *mut *mut RawGroup,
    ) -> *mut c_char;
    fn cnclip_c10d_group_free(group: *mut RawGroup);
    fn cnclip_c10d_all_reduce(
        group: *mut RawGroup,
        tensors: *const TensorPtr,
        n: usize,
        op: i32,
    ) -> *mut c_char;
    fn cnclip_c10d_broadcast(
        group: *mut RawGroup,
        tensors: *const TensorPtr,
        n: usize,
        root: i64,
    ) -> *mut c_char;
    fn cnclip_c10d_all_gather(
        group: *mut RawGroup,
        outputs: *const TensorPtr,
        n: usize,
        input: TensorPtr,
    ) -> *mut c_char;
    fn cnclip_c10d_barrier(group: *mut RawGroup) -> *mut c_char;
}

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("rendezvous at {address} failed (timeout {timeout:?}): {message}")]
    Rendezvous {
        address: String,
        timeout: Duration,
        message: String,
    },
    #[error("creating the {backend} process group (rank {rank} of {size}) failed: {message}")]
    Group {
        backend: &'static str,
        rank: usize,
        size: usize,
        message: String,
    },
    #[error("{op} on rank {rank} of {size} failed (timeout {timeout:?}): {message}")]
    Collective {
        op: &'static str,
        rank: usize,
        size: usize,
        timeout: Duration,
        message: String,
    },
    #[error("{0}")]
    Argument(String),
}

/// Takes ownership of a shim error message.
pub(crate) fn take_error(raw: *mut c_char) -> Option<String> {
    if raw.is_null() {
        return None;
    }
    // SAFETY: non-null results of the shim are NUL-terminated strings it malloc'd for us; we copy
    // and free each exactly once.
    let message = unsafe { CStr::from_ptr(raw) }
        .to_string_lossy()
        .into_owned();
    unsafe { cnclip_c10d_free_error(raw) };
    Some(message)
}

fn c_string(what: &str, value: &str) -> Result<CString, DistError> {
    CString::new(value).map_err(|_| DistError::Argument(format!("{what} contains a NUL byte")))
}

fn millis(timeout: Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

/// Whether this build can create NCCL process groups (the `nccl` feature).
pub fn has_nccl() -> bool {
    // SAFETY: a constant query.
    unsafe { cnclip_c10d_has_nccl() != 0 }
}

/// libtorch's `TCPStore`: the key-value rendezvous every rank connects to.
pub struct Store {
    raw: *mut RawStore,
}

// SAFETY: c10d stores are used from several threads inside libtorch; the handle is only freed in
// Drop.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to the TCPStore at `host:port`; with `is_server` (rank 0, unless a launcher's
    /// agent already hosts the store) also serves it and waits for the `world_size - 1` others.
    /// Gives up after `timeout` with [`DistError::Rendezvous`].
    pub fn tcp(
        host: &str,
        port: u16,
        world_size: usize,
        is_server: bool,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        let c_host = c_string("the rendezvous host", host)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid C string, out-pointer to a local; the shim catches all exceptions.
        let error = unsafe {
            cnclip_c10d_tcp_store(
                c_host.as_ptr(),
                port,
                world_size as i64,
                i32::from(is_server),
                millis(timeout),
                &mut raw,
            )
        };
        match take_error(error) {
            Some(message) => Err(DistError::Rendezvous {
                address: format!("{host}:{port}"),
                timeout,
                message,
            }),
            None => Ok(Self { raw }),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim and is freed once.
        unsafe { cnclip_c10d_store_free(self.raw) }
    }
}

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors over TCP (always built).
    Gloo,
    /// CUDA tensors over NCCL (needs the `nccl` feature and a CUDA torch at run time).
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = DistError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            other => Err(DistError::Argument(format!(
                "unknown distributed backend {other:?}: expected gloo or nccl"
            ))),
        }
    }
}

/// Where a Gloo rank's device binds (torch.distributed's choice, made explicit).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GlooDevice {
    /// This host's resolved name, else loopback (libtorch's default).
    #[default]
    Default,
    /// A host name or address (e.g. `127.0.0.1` for single-node runs).
    Hostname(String),
    /// A network interface (`GLOO_SOCKET_IFNAME`).
    Interface(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Mean over ranks (NCCL only; Gloo refuses it).
    Avg,
    Max,
    Min,
}

impl ReduceOp {
    fn code(self) -> i32 {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Avg => 1,
            ReduceOp::Max => 2,
            ReduceOp::Min => 3,
        }
    }
}

/// A c10d process group of `size` ranks; this process is `rank`.
pub struct ProcessGroup {
    raw: *mut RawGroup,
    backend: Backend,
    rank: usize,
    size: usize,
    timeout: Duration,
}

// SAFETY: c10d backends are thread-safe (torch.distributed calls them from any thread); the
// handle is only freed in Drop.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("backend", &self.backend)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ProcessGroup {
    /// A Gloo group over `store`; its keys live under `prefix` so that several groups can share one
    /// store. Creation waits for all ranks (up to `timeout`); every collective is bounded by it too.
    pub fn gloo(
        store: &Store,
        prefix: &str,
        rank: usize,
        size: usize,
        timeout: Duration,
        device: &GlooDevice,
    ) -> Result<Self, DistError> {
        let (hostname, interface) = match device {
            GlooDevice::Default => (String::new(), String::new()),
            GlooDevice::Hostname(h) => (h.clone(), String::new()),
            GlooDevice::Interface(i) => (String::new(), i.clone()),
        };
        let (prefix_c, host_c, iface_c) = (
            c_string("the store prefix", prefix)?,
            c_string("the Gloo hostname", &hostname)?,
            c_string("the Gloo interface", &interface)?,
        );
        Self::check_rank(rank, size)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: live store handle, valid C strings, out-pointer to a local.
        let error = unsafe {
            cnclip_c10d_gloo(
                store.raw,
                prefix_c.as_ptr(),
                rank as i32,
                size as i32,
                millis(timeout),
                host_c.as_ptr(),
                iface_c.as_ptr(),
                &mut raw,
            )
        };
        Self::made(raw, error, Backend::Gloo, rank, size, timeout)
    }

    /// An NCCL group over `store` (see [`ProcessGroup::gloo`]); tensors must be on this rank's
    /// current CUDA device. Without the `nccl` feature this returns [`DistError::Group`].
    pub fn nccl(
        store: &Store,
        prefix: &str,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        let prefix_c = c_string("the store prefix", prefix)?;
        Self::check_rank(rank, size)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: live store handle, valid C string, out-pointer to a local.
        let error = unsafe {
            cnclip_c10d_nccl(
                store.raw,
                prefix_c.as_ptr(),
                rank as i32,
                size as i32,
                millis(timeout),
                &mut raw,
            )
        };
        Self::made(raw, error, Backend::Nccl, rank, size, timeout)
    }

    fn check_rank(rank: usize, size: usize) -> Result<(), DistError> {
        if size == 0 || rank >= size || i32::try_from(size).is_err() {
            return Err(DistError::Argument(format!(
                "rank {rank} is not in a world of size {size}"
            )));
        }
        Ok(())
    }

    fn made(
        raw: *mut RawGroup,
        error: *mut c_char,
        backend: Backend,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        match take_error(error) {
            Some(message) => Err(DistError::Group {
                backend: backend.name(),
                rank,
                size,
                message,
            }),
            None => Ok(Self {
                raw,
                backend,
                rank,
                size,
                timeout,
            }),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The shim's handle, for [`crate::reducer`].
    pub(crate) fn raw_handle(&self) -> *mut std::ffi::c_void {
        self.raw.cast()
    }

    /// A shim error of this group's collective `op` as a [`DistError::Collective`].
    pub(crate) fn result(&self, op: &'static str, error: *mut c_char) -> Result<(), DistError> {
        match take_error(error) {
            Some(message) => Err(DistError::Collective {
                op,
                rank: self.rank,
                size: self.size,
                timeout: self.timeout,
                message,
            }),
            None => Ok(()),
        }
    }

    fn dense(op: &'static str, tensors: &[&Tensor]) -> Result<(), DistError> {
        for t in tensors {
            if !t.is_contiguous() {
                return Err(DistError::Argument(format!(
                    "{op} needs contiguous tensors (got shape {:?})",
                    t.size()
                )));
            }
        }
        Ok(())
    }

    /// Reduces each tensor in place over all ranks (one collective per tensor, in order).
    pub fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<(), DistError> {
        Self::dense("all_reduce", tensors)?;
        let ptrs: Vec<TensorPtr> = tensors.iter().map(|t| t.as_ptr().cast_mut()).collect();
        // SAFETY: live group; the pointers are live tensors borrowed for the call.
        let error =
            unsafe { cnclip_c10d_all_reduce(self.raw, ptrs.as_ptr(), ptrs.len(), op.code()) };
        self.result("all_reduce", error)
    }

    /// Overwrites each tensor with rank `root`'s.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<(), DistError> {
        Self::dense("broadcast", tensors)?;
        if root >= self.size {
            return Err(DistError::Argument(format!(
                "broadcast root {root} is not in a world of size {}",
                self.size
            )));
        }
        let ptrs: Vec<TensorPtr> = tensors.iter().map(|t| t.as_ptr().cast_mut()).collect();
        // SAFETY: as in all_reduce.
        let error =
            unsafe { cnclip_c10d_broadcast(self.raw, ptrs.as_ptr(), ptrs.len(), root as i64) };
        self.result("broadcast", error)
    }

    /// Every rank's `input` (same shape and dtype everywhere), in rank order.
    pub fn all_gather(&self, input: &Tensor) -> Result<Vec<Tensor>, DistError> {
        let input = input.contiguous();
        let outputs: Vec<Tensor> = (0..self.size).map(|_| input.empty_like()).collect();
        let ptrs: Vec<TensorPtr> = outputs.iter().map(|t| t.as_ptr().cast_mut()).collect();
        // SAFETY: as in all_reduce; `outputs` are fresh tensors of `input`'s shape.
        let error = unsafe {
            cnclip_c10d_all_gather(
                self.raw,
                ptrs.as_ptr(),
                ptrs.len(),
                input.as_ptr().cast_mut(),
            )
        };
        self.result("all_gather", error)?;
        Ok(outputs)
    }

    /// Returns once every rank has reached it.
    pub fn barrier(&self) -> Result<(), DistError> {
        // SAFETY: live group.
        let error = unsafe { cnclip_c10d_barrier(self.raw) };
        self.result("barrier", error)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim and is freed once.
        unsafe { cnclip_c10d_group_free(self.raw) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::test_support::{free_port, two_ranks};
    use std::sync::Arc;
    use tch::{Device, Kind};

    /// Two ranks as two threads of this test process: every collective's result checked.
    #[test]
    fn two_gloo_ranks_in_threads() {
        let run = |rank: usize, pg: Arc<ProcessGroup>| -> Result<Vec<f64>, DistError> {
            let x = Tensor::from_slice(&[1.0f32, 2.0]) * (rank as f64 + 1.0);
            pg.all_reduce(&[&x], ReduceOp::Sum)?;
            let b = Tensor::from_slice(&[rank as f32 + 10.0]);
            pg.broadcast(&[&b], 1)?;
            let parts = pg.all_gather(&Tensor::from_slice(&[rank as i64; 3]))?;
            pg.barrier()?;
            let mut out: Vec<f64> = Vec::<f64>::try_from(x.to_kind(Kind::Double)).unwrap();
            out.push(b.double_value(&[0]));
            for p in parts {
                out.push(p.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]));
            }
            Ok(out)
        };
        let (mine, theirs) = two_ranks("test", run);
        let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
        // all_reduce: [1,2]+[2,4]; broadcast from rank 1; gather: rank 0's zeros, rank 1's ones.
        let expected = vec![3.0, 6.0, 11.0, 0.0, 3.0];
        assert_eq!(mine, expected);
        assert_eq!(theirs, expected);
        let _ = Device::Cpu;
    }

    #[test]
    fn a_missing_rank_is_a_rendezvous_timeout() {
        let port = free_port();
        let start = std::time::Instant::now();
        let err = Store::tcp("127.0.0.1", port, 2, true, Duration::from_millis(1500))
            .and_then(|store| {
                ProcessGroup::gloo(
                    &store,
                    "t",
                    0,
                    2,
                    Duration::from_millis(1500),
                    &GlooDevice::Hostname("127.0.0.1".into()),
                )
            })
            .expect_err("a world of two with one rank cannot form");
        assert!(start.elapsed() < Duration::from_secs(30), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("127.0.0.1") || text.contains("rank 0"),
            "{text}"
        );
    }

    #[test]
    fn no_server_is_a_rendezvous_error() {
        let port = free_port();
        let err = Store::tcp("127.0.0.1", port, 2, false, Duration::from_millis(1000))
            .expect_err("nobody serves this port");
        assert!(matches!(err, DistError::Rendezvous { .. }), "{err}");
    }

    /// The shim turns c10d's flight recorder off at load time (its first record per process
    /// group races when several groups of one process start collectives at once; see c10d.cpp)
    /// unless the process was started with either of its variables.
    #[test]
    fn the_flight_recorder_is_off_unless_asked_for() {
        if std::env::var_os("TORCH_NCCL_TRACE_BUFFER_SIZE").is_some() {
            return;
        }
        assert!(
            std::env::var_os("TORCH_FR_BUFFER_SIZE").is_some(),
            "the shim's load-time default did not run"
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!("mpi".parse::<Backend>().is_err());
        assert_eq!("nccl".parse::<Backend>().unwrap(), Backend::Nccl);
    }
}
