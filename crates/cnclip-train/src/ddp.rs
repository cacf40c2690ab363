//! Data-parallel training as cn_clip does it with `torch.distributed` (setup `main.py:47-176`, gathered
//! loss `train.py:21-126`, rank-0 saving `main.py:314-346` and `train.py:301-329`), on
//! libtorch's own c10d through [`torch_ext::dist`].
//!
//! * **Start**: every rank builds the model, then the parameters and buffers are broadcast from
//!   rank 0 ([`Ddp::broadcast_model`]), as `DistributedDataParallel`'s constructor does.
//! * **Loss over the global batch** ([`Ddp::gather`]), cn_clip's three modes:
//!   - default (`aggregate`): `all_gather` without gradient, rows `[local, other ranks in rank
//!     order]`; the local rows keep their gradient. Every rank computes the loss over the global
//!     batch, and the parameter gradients averaged over ranks are therefore
//!     `(1/W) · ∂L_global/∂θ` for the two towers but `∂L_global/∂logit_scale` for the scale (each
//!     rank differentiates the scale through all rows). That is exactly what a single process on
//!     the concatenated global batch gets when it divides every gradient except `logit_scale`'s by
//!     `W` — the equivalence the 2-rank test checks.
//!   - `--gather-with-grad`: rows in rank order, every row differentiable; its gradient goes back to
//!     the rank that made it, summed over the `W` identical losses (torch's differentiable
//!     `all_gather` backward). After DDP's averaging this is `∂L_global/∂θ` for every parameter:
//!     identical to one process on the concatenated batch.
//!   - `--skip-aggregate`: each rank's loss over its own batch only; averaged gradients are
//!     `∂/∂θ (1/W) Σ_r L_r`: one process minimising the mean of the per-rank losses.
//! * **Gradients** ([`BucketedAllReduce`]): after backward, the parameter gradients are flattened
//!   into buckets of about [`DEFAULT_BUCKET_BYTES`] (in reverse parameter order, as torch's DDP
//!   buckets them), all-reduced (sum) and divided by `W`. tch exposes no autograd hooks, so the
//!   all-reduce cannot overlap the backward pass as torch's reducer does; it runs after it (the
//!   cost is measured in docs/BENCHMARKS.md).
//! * **Data**: each rank reads its shard of muge-data's `DistributedSampler` (`perm[r::W]`), over
//!   the data set padded to whole global batches, as cn_clip.
//! * **Files**: only rank 0 writes checkpoints, metrics and curves and prints the log lines; all
//!   ranks read the same checkpoint on resume and check that they agree on its position.
//!
//! Launch ([`DistEnv`], [`launch`]): torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`), Slurm's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`,
//! `SLURM_LAUNCH_NODE_IPADDR`/`SLURM_NODELIST`), or our own local launcher that spawns and
//! supervises `N` workers.

use crate::loss::FeatureGather;
use crate::trainer::GradientSync;
use cnclip_model::Clip;
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Tensor};
use torch_ext::dist::{Backend, DistError, ProcessGroup, ReduceOp, Store};

pub mod env;
pub mod launch;

pub use env::{DistEnv, EnvError};

/// torch DDP's default `bucket_cap_mb`.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// cn_clip's `--gather-with-grad` / `--skip-aggregate` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GatherMode {
    /// The default: others' features as constants after the local ones.
    #[default]
    Aggregate,
    /// `--gather-with-grad`.
    WithGrad,
    /// `--skip-aggregate`.
    Skip,
}

impl GatherMode {
    /// From cn_clip's two flags (`--skip-aggregate` wins, as in cn_clip where it disables
    /// aggregation altogether).
    pub fn from_flags(gather_with_grad: bool, skip_aggregate: bool) -> Self {
        match (gather_with_grad, skip_aggregate) {
            (_, true) => GatherMode::Skip,
            (true, false) => GatherMode::WithGrad,
            (false, false) => GatherMode::Aggregate,
        }
    }
}

/// One rank's membership in a data-parallel run.
pub struct Ddp {
    group: Arc<ProcessGroup>,
    mode: GatherMode,
    bucket_bytes: usize,
    /// Where the small bookkeeping collectives run (NCCL takes CUDA tensors only).
    scalar_device: Device,
    // Kept alive for the group (rank 0 serves it).
    _store: Store,
}

impl std::fmt::Debug for Ddp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ddp")
            .field("group", &self.group)
            .field("mode", &self.mode)
            .field("bucket_bytes", &self.bucket_bytes)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DdpError {
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error(
        "ranks disagree on {what}: this rank (rank {rank}) has {mine}, the others range over {min}..={max}"
    )]
    Disagree {
        what: String,
        rank: usize,
        mine: u64,
        min: u64,
        max: u64,
    },
}

impl Ddp {
    /// Joins the run described by `env`: TCPStore rendezvous at `MASTER_ADDR:MASTER_PORT` (served
    /// by rank 0 unless torchrun's agent already serves it), then the process group. Every step
    /// waits at most `timeout` for the other ranks.
    pub fn init(
        env: &DistEnv,
        backend: Backend,
        timeout: Duration,
        mode: GatherMode,
    ) -> Result<Self, DdpError> {
        let store = Store::tcp(
            &env.master_addr,
            env.master_port,
            env.world_size,
            env.rank == 0 && !env.agent_store,
            timeout,
        )?;
        let group = match backend {
            Backend::Gloo => ProcessGroup::gloo(
                &store,
                "cnclip/default_pg",
                env.rank,
                env.world_size,
                timeout,
                &env.gloo_device(),
            )?,
            Backend::Nccl => ProcessGroup::nccl(
                &store,
                "cnclip/default_pg",
                env.rank,
                env.world_size,
                timeout,
            )?,
        };
        let scalar_device = match backend {
            Backend::Gloo => Device::Cpu,
            Backend::Nccl => Device::Cuda(env.local_rank),
        };
        Ok(Self {
            group: Arc::new(group),
            mode,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            scalar_device,
            _store: store,
        })
    }

    /// Buckets of about `bytes` for the gradient all-reduce (torch's `bucket_cap_mb`).
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_bytes = bytes.max(1);
        self
    }

    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    pub fn world_size(&self) -> usize {
        self.group.size()
    }

    /// Rank 0: the one that writes files and logs.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    pub fn mode(&self) -> GatherMode {
        self.mode
    }

    pub fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// A shared handle on the process group (e.g. for SyncBatchNorm's collectives).
    pub fn process_group(&self) -> Arc<ProcessGroup> {
        self.group.clone()
    }

    /// The loss's row assembly for this run's [`GatherMode`].
    pub fn gather(&self) -> Box<dyn FeatureGather> {
        match self.mode {
            GatherMode::Aggregate => Box::new(AggregateGather {
                group: self.group.clone(),
            }),
            GatherMode::WithGrad => Box::new(GradGather {
                group: self.group.clone(),
            }),
            GatherMode::Skip => Box::new(crate::loss::LocalOnly),
        }
    }

    /// The gradient all-reduce for [`crate::trainer::Trainer::set_gradient_sync`].
    pub fn gradient_sync(&self) -> Box<dyn GradientSync> {
        Box::new(BucketedAllReduce {
            group: self.group.clone(),
            bucket_bytes: self.bucket_bytes,
            buffers: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Overwrites every parameter and buffer of `model` with rank 0's.
    pub fn broadcast_model(&self, model: &Clip) -> Result<(), DdpError> {
        let tensors: Vec<Tensor> = model.named_tensors().into_values().collect();
        for bucket in buckets(&tensors, self.bucket_bytes) {
            let flat = flatten(&bucket);
            self.group.broadcast(&[&flat], 0)?;
            unflatten_into(&flat, &bucket);
        }
        Ok(())
    }

    /// Fails unless every rank passes the same `value` (e.g. the step a resumed checkpoint is at).
    pub fn agree(&self, what: &str, value: u64) -> Result<(), DdpError> {
        let as_i64 = i64::try_from(value).unwrap_or(i64::MAX);
        let max = Tensor::from_slice(&[as_i64]).to_device(self.scalar_device);
        let min = Tensor::from_slice(&[-as_i64]).to_device(self.scalar_device);
        self.group.all_reduce(&[&max], ReduceOp::Max)?;
        self.group.all_reduce(&[&min], ReduceOp::Max)?;
        let (max, min) = (max.int64_value(&[0]), -min.int64_value(&[0]));
        if max != min {
            return Err(DdpError::Disagree {
                what: what.to_string(),
                rank: self.rank(),
                mine: value,
                min: min.max(0) as u64,
                max: max.max(0) as u64,
            });
        }
        Ok(())
    }

    /// Rank 0's `value`, on every rank.
    pub fn broadcast_u64(&self, value: u64) -> Result<u64, DdpError> {
        let t = Tensor::from_slice(&[i64::try_from(value).unwrap_or(i64::MAX)])
            .to_device(self.scalar_device);
        self.group.broadcast(&[&t], 0)?;
        Ok(t.int64_value(&[0]).max(0) as u64)
    }

    pub fn barrier(&self) -> Result<(), DdpError> {
        Ok(self.group.barrier()?)
    }
}

/// Default mode: `[local, others in rank order]`, others without gradient.
struct AggregateGather {
    group: Arc<ProcessGroup>,
}

impl FeatureGather for AggregateGather {
    fn gather(&self, local: &Tensor) -> Result<Tensor, DistError> {
        let mut parts = self.group.all_gather(&local.detach())?;
        parts[self.group.rank()] = local.shallow_clone();
        let mine = parts.remove(self.group.rank());
        parts.insert(0, mine);
        Ok(Tensor::cat(&parts, 0))
    }
}

/// `--gather-with-grad`: rank-order rows whose gradient is summed over ranks and returned to
/// their owner (torch.distributed.nn's `all_gather` backward).
struct GradGather {
    group: Arc<ProcessGroup>,
}

impl FeatureGather for GradGather {
    fn gather(&self, local: &Tensor) -> Result<Tensor, DistError> {
        Ok(Tensor::cat(&self.group.all_gather(local)?, 0))
    }

    fn differentiable(&self) -> bool {
        true
    }

    fn local_gradient(&self, rows_grad: &Tensor) -> Result<Tensor, DistError> {
        let summed = rows_grad.contiguous().copy();
        self.group.all_reduce(&[&summed], ReduceOp::Sum)?;
        let rows = summed.size()[0] / self.group.size() as i64;
        Ok(summed.narrow(0, self.group.rank() as i64 * rows, rows))
    }
}

/// Sum of the gradients over ranks divided by `W`, in flattened buckets. The flat buffers persist
/// across steps (as torch's reducer keeps its buckets): allocating them afresh every step costs
/// more than the copies into them.
pub struct BucketedAllReduce {
    group: Arc<ProcessGroup>,
    bucket_bytes: usize,
    buffers: std::sync::Mutex<Vec<Tensor>>,
}

impl GradientSync for BucketedAllReduce {
    fn sync(&self, grads: &[Tensor]) -> Result<(), DistError> {
        // Frozen parameters have no gradient on any rank (the freeze is part of the config).
        let defined: Vec<Tensor> = grads
            .iter()
            .rev()
            .filter(|g| g.defined())
            .map(Tensor::shallow_clone)
            .collect();
        let world = self.group.size() as f64;
        let mut buffers = self
            .buffers
            .lock()
            .map_err(|_| DistError::Argument("a gradient sync panicked earlier".into()))?;
        for (i, bucket) in buckets(&defined, self.bucket_bytes).iter().enumerate() {
            let numel: usize = bucket.iter().map(Tensor::numel).sum();
            let fits = buffers.get(i).is_some_and(|b| {
                b.numel() == numel
                    && b.kind() == bucket[0].kind()
                    && b.device() == bucket[0].device()
            });
            if !fits {
                let fresh = Tensor::empty([numel as i64], (bucket[0].kind(), bucket[0].device()));
                match buffers.get_mut(i) {
                    Some(slot) => *slot = fresh,
                    None => buffers.push(fresh),
                }
            }
            let flat = &buffers[i];
            flatten_into(flat, bucket);
            self.group.all_reduce(&[flat], ReduceOp::Sum)?;
            // The mean over ranks, written straight back into the gradients (one pass).
            tch::no_grad(|| {
                let mut offset = 0i64;
                for g in bucket {
                    let n = g.numel() as i64;
                    let _ = flat
                        .narrow(0, offset, n)
                        .view(g.size().as_slice())
                        .div_scalar_out(g, world);
                    offset += n;
                }
            });
        }
        Ok(())
    }
}

/// Consecutive runs of same-dtype, same-device tensors of at most about `bytes` each.
fn buckets(tensors: &[Tensor], bytes: usize) -> Vec<Vec<Tensor>> {
    let mut out: Vec<Vec<Tensor>> = Vec::new();
    let mut size = 0usize;
    for t in tensors {
        let t_bytes = t.numel() * t.kind().elt_size_in_bytes();
        let fits = out.last().is_some_and(|b| {
            b[0].kind() == t.kind() && b[0].device() == t.device() && size + t_bytes <= bytes
        });
        if !fits {
            out.push(Vec::new());
            size = 0;
        }
        size += t_bytes;
        if let Some(b) = out.last_mut() {
            b.push(t.shallow_clone());
        }
    }
    out
}

fn flatten(bucket: &[Tensor]) -> Tensor {
    tch::no_grad(|| {
        let flat: Vec<Tensor> = bucket.iter().map(|t| t.detach().reshape([-1])).collect();
        Tensor::cat(&flat, 0)
    })
}

/// [`flatten`] into an existing buffer of the right size.
fn flatten_into(out: &Tensor, bucket: &[Tensor]) {
    tch::no_grad(|| {
        let flat: Vec<Tensor> = bucket.iter().map(|t| t.detach().reshape([-1])).collect();
        let _ = Tensor::cat_out(out, &flat, 0);
    });
}

fn unflatten_into(flat: &Tensor, bucket: &[Tensor]) {
    tch::no_grad(|| {
        let mut offset = 0i64;
        for t in bucket {
            let n = t.numel() as i64;
            let mut target = t.detach();
            target.copy_(&flat.narrow(0, offset, n).view_(t.size()));
            offset += n;
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn buckets_split_by_size_and_dtype() {
        let a = Tensor::zeros([10], (Kind::Float, tch::Device::Cpu));
        let b = Tensor::zeros([10], (Kind::Float, tch::Device::Cpu));
        let c = Tensor::zeros([3], (Kind::Double, tch::Device::Cpu));
        let sizes: Vec<usize> = buckets(&[a.shallow_clone(), b, c], 60)
            .iter()
            .map(Vec::len)
            .collect();
        // 40 + 40 > 60 bytes: a and b apart; the f64 tensor starts its own bucket.
        assert_eq!(sizes, vec![1, 1, 1]);
        assert_eq!(buckets(&[a.shallow_clone(), a], 80).len(), 1);
    }

    #[test]
    fn flatten_round_trips() {
        let x = Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).view([2, 3]);
        let y = Tensor::arange(4, (Kind::Float, tch::Device::Cpu));
        let flat = flatten(&[x.shallow_clone(), y.shallow_clone()]) * 2.0;
        unflatten_into(&flat, &[x.shallow_clone(), y.shallow_clone()]);
        assert_eq!(x.view([-1]).int64_value(&[5]), 10);
        assert_eq!(y.int64_value(&[3]), 6);
    }

    #[test]
    fn flags_map_like_cn_clip() {
        assert_eq!(GatherMode::from_flags(false, false), GatherMode::Aggregate);
        assert_eq!(GatherMode::from_flags(true, false), GatherMode::WithGrad);
        assert_eq!(GatherMode::from_flags(true, true), GatherMode::Skip);
    }
}
