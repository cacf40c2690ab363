//! Pickle opcodes (CPython's `Lib/pickle.py` names and values) and their names for messages.

macro_rules! opcodes {
    ($($(#[$doc:meta])* $name:ident = $code:expr),* $(,)?) => {
        $($(#[$doc])* pub const $name: u8 = $code;)*

        /// The opcode's name as `pickletools` prints it, `"<unknown>"` for bytes that are none.
        pub fn name(code: u8) -> &'static str {
            match code {
                $($name => stringify!($name),)*
                _ => "<unknown>",
            }
        }
    };
}

opcodes! {
    MARK = b'(',
    STOP = b'.',
    POP = b'0',
    POP_MARK = b'1',
    DUP = b'2',
    FLOAT = b'F',
    INT = b'I',
    BININT = b'J',
    BININT1 = b'K',
    LONG = b'L',
    BININT2 = b'M',
    NONE = b'N',
    PERSID = b'P',
    BINPERSID = b'Q',
    REDUCE = b'R',
    STRING = b'S',
    BINSTRING = b'T',
    SHORT_BINSTRING = b'U',
    UNICODE = b'V',
    BINUNICODE = b'X',
    APPEND = b'a',
    BUILD = b'b',
    GLOBAL = b'c',
    DICT = b'd',
    EMPTY_DICT = b'}',
    APPENDS = b'e',
    GET = b'g',
    BINGET = b'h',
    INST = b'i',
    LONG_BINGET = b'j',
    LIST = b'l',
    EMPTY_LIST = b']',
    OBJ = b'o',
    PUT = b'p',
    BINPUT = b'q',
    LONG_BINPUT = b'r',
    SETITEM = b's',
    TUPLE = b't',
    EMPTY_TUPLE = b')',
    SETITEMS = b'u',
    BINFLOAT = b'G',
    /// Protocol 2.
    PROTO = 0x80,
    NEWOBJ = 0x81,
    EXT1 = 0x82,
    EXT2 = 0x83,
    EXT4 = 0x84,
    TUPLE1 = 0x85,
    TUPLE2 = 0x86,
    TUPLE3 = 0x87,
    NEWTRUE = 0x88,
    NEWFALSE = 0x89,
    LONG1 = 0x8a,
    LONG4 = 0x8b,
    /// Protocol 3.
    BINBYTES = b'B',
    SHORT_BINBYTES = b'C',
    /// Protocol 4.
    SHORT_BINUNICODE = 0x8c,
    BINUNICODE8 = 0x8d,
    BINBYTES8 = 0x8e,
    EMPTY_SET = 0x8f,
    ADDITEMS = 0x90,
    FROZENSET = 0x91,
    NEWOBJ_EX = 0x92,
    STACK_GLOBAL = 0x93,
    MEMOIZE = 0x94,
    FRAME = 0x95,
    /// Protocol 5.
    BYTEARRAY8 = 0x96,
    NEXT_BUFFER = 0x97,
    READONLY_BUFFER = 0x98,
}

/// `pickle.HIGHEST_PROTOCOL` of every CPython since 3.8.
pub const HIGHEST_PROTOCOL: u8 = 5;

/// A set of opcodes: what a [`Policy`](crate::Policy) lets a pickle use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opcodes([u64; 4]);

impl Opcodes {
    /// Every byte: what the machine implements decides.
    pub const ALL: Opcodes = Opcodes([u64::MAX; 4]);

    /// Exactly the opcodes listed.
    pub const fn of(codes: &[u8]) -> Opcodes {
        let mut bits = [0u64; 4];
        let mut i = 0;
        while i < codes.len() {
            let c = codes[i] as usize;
            bits[c / 64] |= 1 << (c % 64);
            i += 1;
        }
        Opcodes(bits)
    }

    pub const fn contains(&self, code: u8) -> bool {
        let c = code as usize;
        self.0[c / 64] & (1 << (c % 64)) != 0
    }
}
