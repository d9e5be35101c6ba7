//! Base64 as memcached's meta commands speak it (`b` flag): standard alphabet, padded output, and a
//! lenient decoder with memcached's exact quirks.
//!
//! The decoder is not RFC 4648 strict, because memcached's is not: bytes outside the alphabet are
//! skipped, the count of alphabet bytes (`=` included) must be a non-zero multiple of four, non-zero
//! trailing bits are accepted (`Zh==` decodes like `Zg==`), and decoding stops after the first block
//! that carries padding. Both directions work on caller buffers and never allocate.

/// Sentinel in [`DECODE`] for bytes outside the alphabet.
const SKIP: u8 = 0x80;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Byte -> 6-bit value; `=` maps to 0 (it is counted, and marks padding); everything else is [`SKIP`].
const DECODE: [u8; 256] = {
    let mut table = [SKIP; 256];
    let mut i = 0;
    while i < 64 {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table[b'=' as usize] = 0;
    table
};

/// Decodes `src` into `out`, returning the decoded length, or `None` where memcached's decoder
/// returns 0 (bad length, bad padding, nothing decoded, or `out` too small).
pub fn decode(src: &[u8], out: &mut [u8]) -> Option<usize> {
    let counted = src.iter().filter(|&&b| DECODE[b as usize] != SKIP).count();
    if counted == 0 || counted % 4 != 0 || counted / 4 * 3 > out.len() {
        return None;
    }
    let mut block = [0u8; 4];
    let mut filled = 0;
    let mut padding = 0;
    let mut len = 0;
    for &byte in src {
        let sextet = DECODE[byte as usize];
        if sextet == SKIP {
            continue;
        }
        if byte == b'=' {
            padding += 1;
        }
        block[filled] = sextet;
        filled += 1;
        if filled == 4 {
            out[len] = (block[0] << 2) | (block[1] >> 4);
            out[len + 1] = (block[1] << 4) | (block[2] >> 2);
            out[len + 2] = (block[2] << 6) | block[3];
            len += 3;
            filled = 0;
            if padding > 0 {
                match padding {
                    1 => len -= 1,
                    2 => len -= 2,
                    _ => return None,
                }
                break;
            }
        }
    }
    (len > 0).then_some(len)
}

/// Appends the padded base64 encoding of `src` to `out`.
pub fn encode_into(src: &[u8], out: &mut Vec<u8>) {
    let mut chunks = src.chunks_exact(3);
    for chunk in &mut chunks {
        let n = (chunk[0] as usize) << 16 | (chunk[1] as usize) << 8 | chunk[2] as usize;
        out.extend_from_slice(&[
            ALPHABET[n >> 18],
            ALPHABET[(n >> 12) & 63],
            ALPHABET[(n >> 6) & 63],
            ALPHABET[n & 63],
        ]);
    }
    match *chunks.remainder() {
        [a] => out.extend_from_slice(&[ALPHABET[(a >> 2) as usize], ALPHABET[((a & 3) << 4) as usize], b'=', b'=']),
        [a, b] => out.extend_from_slice(&[
            ALPHABET[(a >> 2) as usize],
            ALPHABET[(((a & 3) << 4) | (b >> 4)) as usize],
            ALPHABET[((b & 15) << 2) as usize],
            b'=',
        ]),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoded(src: &[u8]) -> Option<Vec<u8>> {
        let mut out = [0u8; 64];
        decode(src, &mut out).map(|len| out[..len].to_vec())
    }

    #[test]
    fn decodes_like_memcached() {
        assert_eq!(decoded(b"Zm9v").as_deref(), Some(&b"foo"[..]));
        assert_eq!(decoded(b"Zg==").as_deref(), Some(&b"f"[..]));
        assert_eq!(decoded(b"Zm8=").as_deref(), Some(&b"fo"[..]));
        // Non-zero trailing bits are accepted (memcached 1.6.18: `mg Zh== b k` answers `kZg== b`).
        assert_eq!(decoded(b"Zh==").as_deref(), Some(&b"f"[..]));
        // Bytes outside the alphabet are skipped.
        assert_eq!(decoded(b"Zm$9v$").as_deref(), Some(&b"foo"[..]));
        // Decoding stops after the first padded block.
        assert_eq!(decoded(b"Zg==Zm9v").as_deref(), Some(&b"f"[..]));
    }

    #[test]
    fn refuses_what_memcached_refuses() {
        for bad in [&b"Zg"[..], b"Zm9", b"Z", b"Zm9v=", b"Zm9v====", b"====", b"A===", b"Zm$v", b"", b"$$$$"] {
            assert_eq!(decoded(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn refuses_output_too_small() {
        let mut out = [0u8; 2];
        assert_eq!(decode(b"Zm9v", &mut out), None);
    }

    #[test]
    fn encodes_with_padding() {
        for (raw, text) in [
            (&b""[..], &b""[..]),
            (b"f", b"Zg=="),
            (b"fo", b"Zm8="),
            (b"foo", b"Zm9v"),
            (b"\x00\x01bin key\xff", b"AAFiaW4ga2V5/w=="),
        ] {
            let mut out = Vec::new();
            encode_into(raw, &mut out);
            assert_eq!(out, text);
        }
    }

    proptest! {
        #[test]
        fn round_trips(raw in proptest::collection::vec(any::<u8>(), 1..=186)) {
            let mut text = Vec::new();
            encode_into(&raw, &mut text);
            let mut out = [0u8; 250];
            let len = decode(&text, &mut out).unwrap();
            prop_assert_eq!(&out[..len], &raw[..]);
        }

        #[test]
        fn never_panics(src in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = [0u8; 250];
            if let Some(len) = decode(&src, &mut out) {
                prop_assert!(len > 0 && len <= src.len());
            }
        }
    }
}
