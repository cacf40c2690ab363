//! Model soups: merging fine-tuned checkpoints in weight space.
//!
//! Owns: the seed's greedy pairwise soup (average the two best; keep the merge if it beats a member,
//! replacing the worst; repeat) and Wortsman et al.'s uniform and greedy soups, over native
//! checkpoints, scored on the validation split through `eval`.
//!
//! May depend on `cnclip-model`, `retrieval` and `eval`. Must never import training: a soup is built
//! from finished checkpoints.
//!
//! The implementation arrives with its issue ("soup: the seed's greedy pairwise soup …").
