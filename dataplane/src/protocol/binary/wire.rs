//! The binary protocol's packet layout: the 24-byte header, opcodes, status codes and their texts.
//!
//! Every packet, request or response, is a [`Header`] followed by `body_len` bytes: extras, then the
//! key, then the value. All integers are big-endian. Nothing here knows what a command does; see
//! [`super::request`] for what each opcode may carry.

/// Length of the fixed header of every packet.
pub const HEADER_LEN: usize = 24;

/// First byte of a request packet.
pub const REQUEST_MAGIC: u8 = 0x80;

/// First byte of a response packet.
pub const RESPONSE_MAGIC: u8 = 0x81;

/// SASL opcodes. Tandem, like a memcached built or started without SASL, answers them with
/// [`Status::UnknownCommand`] (see [`super::request`] for the body each may carry).
pub const SASL_LIST_MECHS: u8 = 0x20;
pub const SASL_AUTH: u8 = 0x21;
pub const SASL_STEP: u8 = 0x22;

/// Expiration of an increment/decrement that must not create a missing item.
pub const ARITH_NO_CREATE: u32 = 0xffff_ffff;

macro_rules! opcodes {
    ($($(#[$meta:meta])* $name:ident = $byte:literal,)*) => {
        /// The opcodes memcached 1.6.18 executes. Anything else (VERBOSITY 0x1b included: 1.6.18 does
        /// not implement it) is answered with [`Status::UnknownCommand`] by the parser.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Opcode {
            $($(#[$meta])* $name = $byte,)*
        }

        impl Opcode {
            /// Every opcode, in wire order.
            pub const ALL: &'static [Opcode] = &[$(Opcode::$name,)*];

            /// The opcode of a request byte, if memcached executes it.
            pub fn from_byte(byte: u8) -> Option<Opcode> {
                match byte {
                    $($byte => Some(Opcode::$name),)*
                    _ => None,
                }
            }
        }
    };
}

opcodes! {
    Get = 0x00,
    Set = 0x01,
    Add = 0x02,
    Replace = 0x03,
    Delete = 0x04,
    Increment = 0x05,
    Decrement = 0x06,
    Quit = 0x07,
    Flush = 0x08,
    GetQ = 0x09,
    Noop = 0x0a,
    Version = 0x0b,
    GetK = 0x0c,
    GetKQ = 0x0d,
    Append = 0x0e,
    Prepend = 0x0f,
    Stat = 0x10,
    SetQ = 0x11,
    AddQ = 0x12,
    ReplaceQ = 0x13,
    DeleteQ = 0x14,
    IncrementQ = 0x15,
    DecrementQ = 0x16,
    QuitQ = 0x17,
    FlushQ = 0x18,
    AppendQ = 0x19,
    PrependQ = 0x1a,
    Touch = 0x1c,
    Gat = 0x1d,
    GatQ = 0x1e,
    GatK = 0x23,
    GatKQ = 0x24,
}

/// What an opcode does, its quiet bit aside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// GET, GETK and their quiet forms; `with_key` echoes the key in the response.
    Get {
        with_key: bool,
    },
    /// TOUCH: a new expiration, answered with the flags only.
    Touch,
    /// GAT, GATK and their quiet forms: a get that also sets a new expiration.
    Gat {
        with_key: bool,
    },
    /// SET, ADD, REPLACE (8 bytes of extras: flags, expiration) and their quiet forms.
    Store(StoreKind),
    /// APPEND, PREPEND and their quiet forms (no extras).
    Concat {
        append: bool,
    },
    Delete,
    /// INCREMENT, DECREMENT and their quiet forms (20 bytes of extras: delta, initial, expiration).
    Arith {
        incr: bool,
    },
    Quit,
    Flush,
    Noop,
    Version,
    Stat,
}

/// The three storage commands that carry flags and an expiration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Set,
    Add,
    Replace,
}

impl Opcode {
    /// The request byte.
    #[inline]
    pub fn byte(self) -> u8 {
        self as u8
    }

    /// Quiet opcodes send nothing on success (and the quiet gets nothing on a miss); errors are
    /// always sent.
    pub fn is_quiet(self) -> bool {
        use Opcode::*;
        matches!(
            self,
            GetQ | GetKQ
                | SetQ
                | AddQ
                | ReplaceQ
                | DeleteQ
                | IncrementQ
                | DecrementQ
                | QuitQ
                | FlushQ
                | AppendQ
                | PrependQ
                | GatQ
                | GatKQ
        )
    }

    /// What the opcode does.
    pub fn family(self) -> Family {
        use Opcode::*;
        match self {
            Get | GetQ => Family::Get { with_key: false },
            GetK | GetKQ => Family::Get { with_key: true },
            Touch => Family::Touch,
            Gat | GatQ => Family::Gat { with_key: false },
            GatK | GatKQ => Family::Gat { with_key: true },
            Set | SetQ => Family::Store(StoreKind::Set),
            Add | AddQ => Family::Store(StoreKind::Add),
            Replace | ReplaceQ => Family::Store(StoreKind::Replace),
            Append | AppendQ => Family::Concat { append: true },
            Prepend | PrependQ => Family::Concat { append: false },
            Delete | DeleteQ => Family::Delete,
            Increment | IncrementQ => Family::Arith { incr: true },
            Decrement | DecrementQ => Family::Arith { incr: false },
            Quit | QuitQ => Family::Quit,
            Flush | FlushQ => Family::Flush,
            Noop => Family::Noop,
            Version => Family::Version,
            Stat => Family::Stat,
        }
    }
}

/// Response status codes memcached sends, with the texts it puts in error bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    Ok = 0x00,
    KeyNotFound = 0x01,
    KeyExists = 0x02,
    TooLarge = 0x03,
    InvalidArguments = 0x04,
    NotStored = 0x05,
    NonNumeric = 0x06,
    /// Sent for FLUSH when flush_all is disabled (`-F`).
    AuthError = 0x20,
    UnknownCommand = 0x81,
    OutOfMemory = 0x82,
    /// Not sent by memcached 1.6.18 in these paths; Tandem's read-only standby answers writes with it
    /// (body `read-only standby`).
    NotSupported = 0x83,
}

impl Status {
    /// Every status, for tests.
    pub const ALL: &'static [Status] = &[
        Status::Ok,
        Status::KeyNotFound,
        Status::KeyExists,
        Status::TooLarge,
        Status::InvalidArguments,
        Status::NotStored,
        Status::NonNumeric,
        Status::AuthError,
        Status::UnknownCommand,
        Status::OutOfMemory,
        Status::NotSupported,
    ];

    /// The wire value.
    #[inline]
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The status of a wire value, if memcached sends it.
    pub fn from_code(code: u16) -> Option<Status> {
        Status::ALL
            .iter()
            .copied()
            .find(|status| status.code() == code)
    }

    /// The body memcached's `write_bin_error` sends for this status (empty for [`Status::Ok`]).
    /// Out-of-memory errors carry a more specific text; see [`OOM_ALLOCATING_ITEM`] and friends.
    pub fn message(self) -> &'static [u8] {
        match self {
            Status::Ok => b"",
            Status::KeyNotFound => b"Not found",
            Status::KeyExists => b"Data exists for key.",
            Status::TooLarge => b"Too large.",
            Status::InvalidArguments => b"Invalid arguments",
            Status::NotStored => b"Not stored.",
            Status::NonNumeric => b"Non-numeric server-side value for incr or decr",
            Status::AuthError => b"Auth failure.",
            Status::UnknownCommand => b"Unknown command",
            Status::OutOfMemory => b"Out of memory",
            Status::NotSupported => b"Not supported",
        }
    }
}

/// Body of [`Status::OutOfMemory`] when a value cannot be allocated (set family, append, prepend).
pub const OOM_ALLOCATING_ITEM: &[u8] = b"Out of memory allocating item";
/// Body of [`Status::OutOfMemory`] when an increment or decrement cannot store its result.
pub const OOM_INCREMENTING: &[u8] = b"Out of memory incrementing value";
/// Body of [`Status::OutOfMemory`] when an increment or decrement cannot create its missing item.
pub const OOM_ALLOCATING_NEW_ITEM: &[u8] = b"Out of memory allocating new item";

/// The fixed header, decoded. In a response, `vbucket` is the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub magic: u8,
    pub opcode: u8,
    pub key_len: u16,
    pub extras_len: u8,
    pub data_type: u8,
    pub vbucket: u16,
    pub body_len: u32,
    /// Copied from request to response unchanged.
    pub opaque: u32,
    pub cas: u64,
}

impl Header {
    /// Decodes the first [`HEADER_LEN`] bytes of a packet.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Header {
        let u16_at = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        Header {
            magic: bytes[0],
            opcode: bytes[1],
            key_len: u16_at(2),
            extras_len: bytes[4],
            data_type: bytes[5],
            vbucket: u16_at(6),
            body_len: u32_at(8),
            opaque: u32_at(12),
            cas: (u64::from(u32_at(16)) << 32) | u64::from(u32_at(20)),
        }
    }

    /// Appends the encoded header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0] = self.magic;
        bytes[1] = self.opcode;
        bytes[2..4].copy_from_slice(&self.key_len.to_be_bytes());
        bytes[4] = self.extras_len;
        bytes[5] = self.data_type;
        bytes[6..8].copy_from_slice(&self.vbucket.to_be_bytes());
        bytes[8..12].copy_from_slice(&self.body_len.to_be_bytes());
        bytes[12..16].copy_from_slice(&self.opaque.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.cas.to_be_bytes());
        out.extend_from_slice(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_round_trip_and_unsupported_ones_are_unknown() {
        for &opcode in Opcode::ALL {
            assert_eq!(Opcode::from_byte(opcode.byte()), Some(opcode));
        }
        assert_eq!(Opcode::ALL.len(), 32);
        // VERBOSITY, the SASL opcodes, memcached's range operations and anything newer.
        for byte in [
            0x1b,
            0x1f,
            SASL_LIST_MECHS,
            SASL_AUTH,
            SASL_STEP,
            0x25,
            0x30,
            0x3d,
            0x80,
            0xff,
        ] {
            assert_eq!(Opcode::from_byte(byte), None, "{byte:#x}");
        }
    }

    #[test]
    fn quiet_opcodes_are_the_q_forms() {
        let quiet: Vec<u8> = Opcode::ALL
            .iter()
            .filter(|o| o.is_quiet())
            .map(|o| o.byte())
            .collect();
        assert_eq!(
            quiet,
            [0x09, 0x0d, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1e, 0x24]
        );
    }

    #[test]
    fn status_texts_are_memcacheds() {
        assert_eq!(Status::KeyNotFound.message(), b"Not found");
        assert_eq!(Status::KeyExists.message(), b"Data exists for key.");
        assert_eq!(Status::TooLarge.message(), b"Too large.");
        assert_eq!(Status::InvalidArguments.message(), b"Invalid arguments");
        assert_eq!(Status::NotStored.message(), b"Not stored.");
        assert_eq!(
            Status::NonNumeric.message(),
            b"Non-numeric server-side value for incr or decr"
        );
        assert_eq!(Status::AuthError.message(), b"Auth failure.");
        assert_eq!(Status::UnknownCommand.message(), b"Unknown command");
        assert_eq!(Status::OutOfMemory.message(), b"Out of memory");
        for &status in Status::ALL {
            assert_eq!(Status::from_code(status.code()), Some(status));
        }
    }

    #[test]
    fn header_layout_is_big_endian() {
        let header = Header {
            magic: REQUEST_MAGIC,
            opcode: 0x01,
            key_len: 0x0102,
            extras_len: 8,
            data_type: 0,
            vbucket: 0x0304,
            body_len: 0x0506_0708,
            opaque: 0xdead_beef,
            cas: 0x1122_3344_5566_7788,
        };
        let mut out = Vec::new();
        header.encode(&mut out);
        assert_eq!(
            out,
            [
                0x80, 0x01, 0x01, 0x02, 8, 0, 0x03, 0x04, 5, 6, 7, 8, 0xde, 0xad, 0xbe, 0xef, 0x11,
                0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
        assert_eq!(Header::decode(out[..].try_into().unwrap()), header);
    }
}
