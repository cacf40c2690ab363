//! The order in which a rank visits samples: torch's `DistributedSampler` over cn_clip's padded
//! data set, reproduced index for index.
//!
//! cn_clip trains with `DistributedSampler(dataset, shuffle=True, seed=args.seed)` and
//! `set_epoch(epoch)` (validation: epoch 0), over a data set whose length `pad_dataset` rounded up
//! to a whole number of global batches. Reproducing its permutation matters for two reasons: a
//! run here sees the same batches as a reference run (so losses can be compared step by step), and
//! a resumed run continues exactly where it stopped.
//!
//! * [`Mt19937`] is the standard 32-bit Mersenne Twister (`init_genrand`), which is torch's CPU
//!   generator (`at::mt19937`); `manual_seed(s)` keeps the low 32 bits of `s`.
//! * [`randperm`] is torch's CPU `randperm`: for `n < 2³²/20` a forward Fisher–Yates with
//!   `random() % (n - i)`; above that the "inside-out" variant drawing 64-bit numbers (two
//!   32-bit draws, the first as the high half).
//! * [`DistributedSampler`] pads the permutation cyclically to a multiple of the world size (or
//!   drops the tail with `drop_last`) and gives rank `r` the slice `perm[r::W]`.
//! * [`EpochPlan`] adds what torch lacks: starting mid-epoch after a given number of samples (a
//!   step checkpoint's data offset), without changing which samples follow.

/// torch's CPU generator: MT19937 (32-bit) with the reference `init_genrand` seeding.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Mt19937 {
    /// `torch.Generator().manual_seed(seed)`: only the low 32 bits of the seed matter
    /// (`at::mt19937::init_with_uint32`).
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= MATRIX_A;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// The next 32-bit output (`CPUGeneratorImpl::random`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// The next 64-bit output (`CPUGeneratorImpl::random64`): two draws, the first one high.
    pub fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (hi << 32) | lo
    }
}

/// Above this length torch's `randperm` switches algorithm (`n < UINT32_MAX / 20`).
pub const RANDPERM_SMALL_LIMIT: u64 = u32::MAX as u64 / 20;

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU.
pub fn randperm(n: u64, seed: u64) -> Vec<u64> {
    let mut rng = Mt19937::new(seed);
    let len = usize::try_from(n).unwrap_or(usize::MAX);
    if n < RANDPERM_SMALL_LIMIT {
        let mut r: Vec<u64> = (0..n).collect();
        for i in 0..len.saturating_sub(1) {
            let z = u64::from(rng.next_u32()) % (n - i as u64);
            r.swap(i, i + z as usize);
        }
        r
    } else {
        let mut r = vec![0u64; len];
        for i in 0..len {
            let z = (rng.next_u64() % (i as u64 + 1)) as usize;
            r[i] = r[z];
            r[z] = i as u64;
        }
        r
    }
}

/// cn_clip's `pad_dataset`: the data set length rounded up to whole global batches
/// (`ceil(n / global_batch) * global_batch`); indices past `n` wrap to `index % n`.
pub fn pad_dataset_len(n: u64, global_batch_size: u64) -> Result<u64, SamplerError> {
    if global_batch_size == 0 {
        return Err(SamplerError::ZeroBatch);
    }
    n.div_ceil(global_batch_size)
        .checked_mul(global_batch_size)
        .ok_or(SamplerError::Overflow {
            n,
            global_batch_size,
        })
}

/// Invalid sampler settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamplerError {
    #[error("the world size must be at least 1")]
    ZeroReplicas,
    #[error("rank {rank} is outside the world of {world_size} ranks (expected 0..{world_size})")]
    Rank { rank: u64, world_size: u64 },
    #[error("the batch size must be at least 1")]
    ZeroBatch,
    #[error("padding {n} samples to a multiple of {global_batch_size} overflows")]
    Overflow { n: u64, global_batch_size: u64 },
    #[error(
        "cannot resume at sample {offset} of an epoch in which this rank has only {num_samples}"
    )]
    Offset { offset: u64, num_samples: u64 },
}

/// `torch.utils.data.DistributedSampler` (torch 2.11) for one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistributedSampler {
    len: u64,
    num_replicas: u64,
    rank: u64,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
}

impl DistributedSampler {
    /// A sampler over a data set of `len` samples (cn_clip: the padded length), shuffling with
    /// `seed` as cn_clip does (`shuffle=True`, `drop_last=False`).
    pub fn new(len: u64, num_replicas: u64, rank: u64, seed: u64) -> Result<Self, SamplerError> {
        if num_replicas == 0 {
            return Err(SamplerError::ZeroReplicas);
        }
        if rank >= num_replicas {
            return Err(SamplerError::Rank {
                rank,
                world_size: num_replicas,
            });
        }
        Ok(DistributedSampler {
            len,
            num_replicas,
            rank,
            shuffle: true,
            seed,
            drop_last: false,
        })
    }

    /// `shuffle=False`: the identity order (then padded and strided the same way).
    pub fn with_shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// `drop_last=True`: drop the tail instead of padding when `len % W != 0`.
    pub fn with_drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Samples this rank visits per epoch (`len(sampler)`).
    pub fn num_samples(&self) -> u64 {
        if self.drop_last && !self.len.is_multiple_of(self.num_replicas) {
            // ceil((len - W) / W) with Python's float-free semantics for len < W: 0.
            self.len
                .saturating_sub(self.num_replicas)
                .div_ceil(self.num_replicas)
        } else {
            self.len.div_ceil(self.num_replicas)
        }
    }

    /// Samples all ranks together visit per epoch.
    pub fn total_size(&self) -> u64 {
        self.num_samples() * self.num_replicas
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn rank(&self) -> u64 {
        self.rank
    }

    pub fn num_replicas(&self) -> u64 {
        self.num_replicas
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// `list(iter(sampler))` after `set_epoch(epoch)`: data set indices (`< len`) for this rank.
    pub fn indices(&self, epoch: u64) -> Vec<u64> {
        let all: Vec<u64> = if self.shuffle {
            randperm(self.len, self.seed.wrapping_add(epoch))
        } else {
            (0..self.len).collect()
        };
        let total = self.total_size();
        if all.is_empty() {
            return Vec::new();
        }
        // Padding repeats the permutation cyclically; `drop_last` truncates it. Either way
        // position j of the extended list is all[j % len].
        (self.rank..total)
            .step_by(self.num_replicas as usize)
            .map(|j| all[(j % self.len) as usize])
            .collect()
    }

    /// The epoch's order for this rank, starting after `offset` samples this rank has already
    /// consumed (0 for a fresh epoch). Resuming mid-epoch with the offset of a checkpoint gives
    /// exactly the samples the interrupted run had not yet seen, in the same order.
    pub fn plan(&self, epoch: u64, offset: u64) -> Result<EpochPlan, SamplerError> {
        let num_samples = self.num_samples();
        if offset > num_samples {
            return Err(SamplerError::Offset {
                offset,
                num_samples,
            });
        }
        let mut indices = self.indices(epoch);
        indices.drain(..offset as usize);
        Ok(EpochPlan {
            epoch,
            offset,
            indices,
        })
    }
}

/// One rank's samples for one epoch, possibly resumed part-way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    /// The epoch number (`set_epoch`), also part of each sample's augmentation seed.
    pub epoch: u64,
    /// How many of this rank's samples were skipped at the start.
    pub offset: u64,
    /// Data set indices still to visit, in order (may be ≥ the number of pairs: padding wraps).
    pub indices: Vec<u64>,
}

impl EpochPlan {
    /// The samples, in order, grouped into batches of `batch_size` (the last may be shorter, as
    /// `DataLoader(drop_last=False)` gives).
    pub fn batches(&self, batch_size: usize) -> Result<std::slice::Chunks<'_, u64>, SamplerError> {
        if batch_size == 0 {
            return Err(SamplerError::ZeroBatch);
        }
        Ok(self.indices.chunks(batch_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference MT19937 output for `init_genrand(5489)` (the C++ `std::mt19937` default):
    /// the 10000th draw is 4123659995 (C++11 [rand.predef]).
    #[test]
    fn mt19937_reference_value() {
        let mut g = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_keeps_low_32_bits() {
        let a: Vec<u32> = {
            let mut g = Mt19937::new(7);
            (0..5).map(|_| g.next_u32()).collect()
        };
        let mut g = Mt19937::new(7 + (1 << 32));
        let b: Vec<u32> = (0..5).map(|_| g.next_u32()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn permutation_is_a_permutation() {
        for n in [0u64, 1, 2, 3, 10, 1000] {
            let mut p = randperm(n, 42);
            p.sort_unstable();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn ranks_partition_the_padded_epoch() {
        let n = 10;
        let w = 4;
        let mut seen = Vec::new();
        for r in 0..w {
            let s = DistributedSampler::new(n, w, r, 3).unwrap();
            assert_eq!(s.num_samples(), 3);
            seen.extend(s.indices(5));
        }
        seen.sort_unstable();
        // 12 slots: every index once plus two wrapped ones.
        assert_eq!(seen.len(), 12);
        seen.dedup();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn resume_offset_continues_the_same_order() {
        let s = DistributedSampler::new(100, 2, 1, 123).unwrap();
        let full = s.plan(3, 0).unwrap();
        let resumed = s.plan(3, 17).unwrap();
        assert_eq!(&full.indices[17..], &resumed.indices[..]);
        assert!(s.plan(3, 51).is_err());
        assert!(s.plan(3, 50).unwrap().indices.is_empty());
    }

    #[test]
    fn invalid_settings_are_errors() {
        assert_eq!(
            DistributedSampler::new(5, 0, 0, 0).unwrap_err(),
            SamplerError::ZeroReplicas
        );
        assert!(DistributedSampler::new(5, 2, 2, 0).is_err());
        assert!(pad_dataset_len(5, 0).is_err());
        assert_eq!(pad_dataset_len(250_314, 720).unwrap(), 250_560);
        assert_eq!(pad_dataset_len(0, 8).unwrap(), 0);
    }
}
