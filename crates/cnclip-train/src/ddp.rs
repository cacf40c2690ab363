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
//! * **Gradients** ([`Ddp::gradient_sync`]): torch's own DDP engine, `c10d::Reducer`
//!   ([`torch_ext::reducer`]), with `DistributedDataParallel`'s settings: buckets by size
//!   (`bucket_cap_mb` 25, a 1 MiB first bucket; one unbounded bucket in the first iteration, then
//!   rebuilt once in the order the gradients became ready), autograd hooks that all-reduce each
//!   bucket as soon as its gradients are ready — during the backward pass —, gradients as views
//!   into the buckets, the `--ddp-comm-hook` compression and `--ddp-find-unused-parameters`.
//!   Accumulation runs the first `accum_freq − 1` backward passes of a step under `no_sync`
//!   (local accumulation) and reduces once, in the last. Frozen weights are not in the reducer.
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
use torch_ext::reducer::{CommHook, Reducer, ReducerOptions, sync_module_states};

pub mod env;
pub mod launch;

pub use env::{DistEnv, EnvError};

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
    /// `DistributedDataParallel`'s bucket, hook and unused-parameter settings.
    reducer: ReducerOptions,
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
            .field("reducer", &self.reducer)
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
            reducer: ReducerOptions::default(),
            scalar_device,
            _store: store,
        })
    }

    /// Buckets of about `bytes` for the gradient all-reduce (torch's `bucket_cap_mb`; the first
    /// bucket stays capped at 1 MiB, or at `bytes` when that is smaller).
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.reducer.bucket_bytes = bytes.max(1);
        self.reducer.first_bucket_bytes = self.reducer.first_bucket_bytes.min(bytes.max(1));
        self
    }

    /// `--ddp-comm-hook`: how the buckets are communicated.
    pub fn with_comm_hook(mut self, hook: CommHook) -> Self {
        self.reducer.comm_hook = hook;
        self
    }

    /// `--ddp-find-unused-parameters` (see [`ReducerOptions::find_unused_parameters`]).
    pub fn with_find_unused_parameters(mut self, on: bool) -> Self {
        self.reducer.find_unused_parameters = on;
        self
    }

    pub fn reducer_options(&self) -> ReducerOptions {
        self.reducer
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

    /// A shared handle on the process group (SyncBatchNorm's collectives, benchmarks).
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

    /// The gradient averaging for [`crate::trainer::Trainer::set_gradient_sync`]: torch's
    /// reducer over the weights of `model` that require grad — call it on the trainer's model,
    /// after the trainer applied the run's freeze (and precision).
    pub fn gradient_sync(&self, model: &Clip) -> Result<Box<dyn GradientSync>, DdpError> {
        let reducer = Reducer::new(self.group.clone(), &trainable_params(model), self.reducer)?;
        Ok(Box::new(ReducerSync { reducer }))
    }

    /// What `DistributedDataParallel`'s constructor does first: checks that every rank has the
    /// same trainable weights (count, shapes, dtypes), then overwrites every parameter and buffer
    /// of `model` with rank 0's.
    pub fn broadcast_model(&self, model: &Clip) -> Result<(), DdpError> {
        let states: Vec<Tensor> = model.named_tensors().into_values().collect();
        let params = trainable_params(model);
        sync_module_states(
            &self.group,
            &params.iter().collect::<Vec<_>>(),
            &states.iter().collect::<Vec<_>>(),
        )?;
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

/// DDP's gradient averaging on torch's own reducer ([`torch_ext::reducer::Reducer`]): the
/// all-reduce of each bucket starts inside the backward pass, from the autograd hooks the
/// reducer registered on the parameters' gradient accumulators.
struct ReducerSync {
    reducer: Reducer,
}

impl GradientSync for ReducerSync {
    fn before_backward(&self, sync: bool, outputs: Option<&[&Tensor]>) -> Result<(), DistError> {
        match outputs {
            Some(outputs) => self.reducer.prepare(sync, outputs),
            None if sync && self.reducer.options().find_unused_parameters => {
                Err(DistError::Argument(
                    "find_unused_parameters cannot search a staged (gradient-checkpointed) \
                     backward pass: the checkpointed blocks are not in the loss's graph"
                        .into(),
                ))
            }
            None => self.reducer.prepare(sync, &[]),
        }
    }

    fn after_backward(&self) -> Result<(), DistError> {
        self.reducer.check_finalized()
    }
}

/// The weights DDP reduces: those that require grad, in the order the model created them (torch's
/// `module.parameters()` order), each once.
fn trainable_params(model: &Clip) -> Vec<Tensor> {
    let mut seen = std::collections::HashSet::new();
    model
        .var_store()
        .trainable_variables()
        .into_iter()
        .filter(|t| t.requires_grad() && seen.insert(t.data_ptr() as usize))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn flags_map_like_cn_clip() {
        assert_eq!(GatherMode::from_flags(false, false), GatherMode::Aggregate);
        assert_eq!(GatherMode::from_flags(true, false), GatherMode::WithGrad);
        assert_eq!(GatherMode::from_flags(true, true), GatherMode::Skip);
    }
}
