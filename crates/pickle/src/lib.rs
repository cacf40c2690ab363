//! The workspace's one pickle implementation: a restricted machine that reads protocols 0 to 5
//! and a writer that encodes as CPython's C pickler does.
//!
//! Reading builds only plain data (None, bools, ints, floats, str, bytes, tuples, lists, dicts)
//! unless a user's [`Globals`] allow-list lets named callables and persistent ids build more, as
//! `torch.load(weights_only=True)` does for tensors; any other callable is refused by name and
//! nothing is ever imported or run. A [`Policy`] narrows further: which opcodes, which protocols,
//! whether `STOP` must end the data.
//!
//! Users: `cnclip-model` reads and writes `torch.save` archives (its allow-list: torch's tensor
//! rebuilders and storages plus [`builtin`] containers); `muge-data` reads and writes the
//! `(image_id, text_id, text)` values of cn_clip's LMDB (no globals, a dozen opcodes).

mod load;
pub mod op;
mod value;
mod write;

pub use load::{Globals, NoGlobals, Policy, Refusal, builtin, load, reduce};
pub use op::Opcodes;
pub use value::{Dict, Global, List, Value};
pub use write::Writer;

/// Why a pickle was not read. Offsets are bytes from the start of the pickle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleError {
    #[error(
        "the pickle ends early: the opcode at byte {offset} needs {wanted} bytes at byte {at}, only {remaining} remain"
    )]
    Truncated {
        /// The opcode being read.
        offset: usize,
        /// Where its missing argument starts.
        at: usize,
        wanted: usize,
        remaining: usize,
    },
    /// `protocol` 0: the policy wants a `PROTO` and the pickle does not begin with one.
    #[error(
        "unsupported pickle protocol {protocol} at byte {offset} (expected {oldest} to {})",
        op::HIGHEST_PROTOCOL
    )]
    Protocol {
        offset: usize,
        protocol: u8,
        oldest: u8,
    },
    #[error("unsupported pickle opcode {name} (0x{code:02x}) at byte {offset}")]
    Opcode {
        name: &'static str,
        code: u8,
        offset: usize,
    },
    #[error("malformed pickle at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
    #[error("pickle at byte {offset} calls {module}.{name}, which is not on the allow-list")]
    Global {
        offset: usize,
        module: String,
        name: String,
    },
}

impl PickleError {
    /// For [`PickleError::Truncated`], how many bytes are missing.
    pub fn missing(&self) -> Option<usize> {
        match self {
            PickleError::Truncated {
                wanted, remaining, ..
            } => Some(wanted - remaining),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
