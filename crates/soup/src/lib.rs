//! Model soups: merging fine-tuned checkpoints in weight space.
//!
//! Owns: the greedy pairwise soup (merge the best two, keep the merge if it beats a member, repeat)
//! and Wortsman et al.'s (2022) uniform and greedy soups as
//! decision procedures ([`strategy`]); the streamed, fp32-accumulated weighted average of native
//! checkpoints ([`average`], [`sink`]); turning official `.pt`, Hugging Face directories and LoRA
//! adapters into averageable files ([`candidate`], [`lora`]); scoring a checkpoint on the
//! validation split through `retrieval` and `eval` ([`score`]) with a per-checkpoint cache
//! ([`cache`]); the report ([`report`]); and a whole run ([`run`]), which the `cnclip-soup` binary
//! (`cargo xtask soup`) drives.
//!
//! May depend on `cnclip-model`, `cnclip-lora` (to merge adapters), `muge-data` (to read the
//! validation LMDB), `retrieval`, `eval` and `torch-ext` (device selection). Must never import
//! training: a soup is built from finished checkpoints.
//!
//! | module | what |
//! |---|---|
//! | [`average`] | the plan (keys, shapes, dtypes, config checked; offending key named) and the key-by-key weighted sum |
//! | [`sink`] | where an average goes: a native file (atomic), a model's variables, a state dict; the in-memory reference |
//! | [`recipe`] | a merge as weights over the original candidates |
//! | [`strategy`] | pairwise, greedy, uniform over an evaluation callback |
//! | [`candidate`], [`lora`] | input paths → native files (`.pt`, HF, LoRA adapter + base materialised once) |
//! | [`score`] | validation split → features → top-10 → Recall@1/5/10 and their mean (MR) |
//! | [`cache`] | scores and features per checkpoint and per merge |
//! | [`report`], [`run`] | Markdown/JSON report; the whole run |
//!
//! # Averaging
//!
//! `Σ wᵢ·xᵢ` per tensor, in fp32 (fp64 for fp64 tensors), members left to right — bit-identical
//! to torch's `x₀*w₀ + x₁*w₁ + …` — written in the members' dtype (the widest when they differ).
//! Tensors are visited one at a time from memory-mapped files, so memory is one tensor plus
//! whatever the sink keeps (a file sink: nothing; a model sink: the model being scored). Configs,
//! key sets and shapes must agree exactly. Integer and bool tensors are not averaged: every member
//! must hold the same bytes (an error names the key otherwise), except BatchNorm's
//! `num_batches_tracked` counters, which take their maximum.
//!
//! Merges of merges are flattened to weights over the original candidates ([`recipe::Recipe`]) and
//! always averaged from the candidates' files, so no intermediate is ever rounded or written.
//! LoRA candidates enter as their base with the adapter merged in.
//!
//! # The greedy pairwise soup
//!
//! A MUGE recipe merged by hand: "average the two best, score on validation, if better than any member
//! replace the worst, repeat until no merge helps" (83.41 → 83.69 valid MR). As implemented:
//!
//! 1. The pool is every candidate with its score.
//! 2. Take the two best entries of the pool, `a` ≥ `b` (equal scores: the earlier entry first;
//!    candidates in the order given, merges after them in creation order).
//! 3. Score their uniform average `M = (a + b) / 2`.
//! 4. "If better than any member": `M` is kept when it scores strictly above at least one of the
//!    two, i.e. above `b` ([`strategy::Accept::BeatsEither`]; [`strategy::Accept::BeatsBoth`]
//!    requires strictly above `a`). Otherwise stop.
//! 5. "Replace the worst": `M` replaces the worst entry of the *pool* (the lowest score; of equals
//!    the latest entry) — the pool keeps its size and both parents stay in it. Go to 2.
//!
//! The result is the pool's best entry when the loop stops (a single candidate if no merge helped).
//!
//! Reading "the worst" as the worse member of the pair (`b`) rather than of the pool changes
//! little: a kept `M` beats `b`, which beats everything but `a`, so the next pair is `(a, M)` or
//! `(M, a)` either way; the readings differ only in whether `b` stays available to later rounds.
//! The loop ends by itself on real data: each round replaces a pool entry by one with a strictly
//! higher score, scores are multiples of `100 / (3·queries)`, and they are bounded. A guard stops
//! it anyway after `max_rounds` merges or if a pair were ever to repeat.
//!
//! Worked example (the trace `tests/strategy.rs` checks), candidates a 83.41, b 83.30, c 83.10,
//! d 82.90:
//!
//! | round | pair | merge (weights over candidates) | MR | decision | pool after |
//! |---|---|---|---|---|---|
//! | 1 | a, b | M1 = ½a + ½b | 83.55 | > b: keep, replace d | M1 83.55, a, b, c |
//! | 2 | M1, a | M2 = ¾a + ¼b | 83.48 | > a: keep, replace c | M1, M2 83.48, a, b |
//! | 3 | M1, M2 | M3 = ⅝a + ⅜b | 83.69 | > M2: keep, replace b | M3 83.69, M1, M2, a |
//! | 4 | M3, M1 | M4 = 9⁄16a + 7⁄16b | 83.50 | ≤ both: stop | — |
//!
//! Result: M3 (83.69). With `BeatsBoth`, round 2's M2 (83.48 ≤ M1's 83.55) stops the loop with M1.
//!
//! # Wortsman et al.'s soups
//!
//! * Greedy: candidates by score, best first (ties: input order); the soup starts as the best;
//!   each next candidate is added when the uniform average of the soup with it scores strictly
//!   above the soup without it. E.g. a 83.41, b 83.30, c 83.10, d 82.90: {a,b} 83.50 > 83.41 add
//!   b; {a,b,c} 83.50 is not above 83.50, skip c; {a,b,d} 83.60 add d → ⅓(a+b+d).
//! * Uniform: the average of all candidates (scored for the report, kept whatever its score).
//!
//! # Scoring and the cache
//!
//! [`score::score_model`] encodes every image of the split's LMDB and every query (with the
//! product prompt when asked), takes the exact top-10 images per query with
//! `retrieval::search` and computes MUGE Recall@1/5/10 and their mean with `eval::muge_score` —
//! the numbers `extract_features.py` + `make_topk_predictions.py` + `evaluation.py` give.
//! Features and scores are cached per checkpoint (path + size + mtime) and per merge (its members
//! and weights), together with the data's identity and the settings that change features, so a
//! rerun scores nothing and `--report-only` rebuilds the report from the cache alone.

pub mod average;
pub mod cache;
pub mod candidate;
pub mod error;
pub mod lora;
pub mod recipe;
pub mod report;
pub mod run;
pub mod score;
pub mod sink;
pub mod strategy;

pub use error::SoupError;
pub use recipe::Recipe;
pub use strategy::{Outcome, Strategy};
