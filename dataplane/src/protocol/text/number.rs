//! Numbers as memcached reads them: C's `strtol`/`strtoull` behind its `safe_strto*` checks (LP64).
//!
//! Clients can observe every one of these rules, so they are kept:
//! - leading C whitespace (`\t`, `\v`, `\f`, `\r`; a token never holds a space) and one sign are skipped;
//! - the digits may be followed by whitespace and then anything (`5\tjunk` reads as 5);
//! - a value outside the 64-bit range is refused, a value inside it is truncated to the field's width the
//!   way a C assignment truncates it (flags `4294967296` reads as 0, exptime `4294967306` as 10,
//!   exptime `2147483648` as -2147483648);
//! - an unsigned field refuses a minus sign only when the wrapped value looks negative as a signed one
//!   (`-0` is 0; `-1` is refused).

/// What C's `isspace` accepts in the "C" locale.
fn is_c_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// A converted token: its sign and the magnitude of its digits.
struct Scanned {
    negative: bool,
    magnitude: u64,
}

/// The part `strtol` and `strtoull` share, with `safe_strto*`'s checks of what follows the digits.
/// `None` for no digits, a magnitude beyond 64 bits (ERANGE), or a non-space right after the digits.
fn scan(token: &[u8]) -> Option<Scanned> {
    let mut at = token.iter().take_while(|&&byte| is_c_space(byte)).count();
    let negative = match token.get(at) {
        Some(b'-') => {
            at += 1;
            true
        }
        Some(b'+') => {
            at += 1;
            false
        }
        _ => false,
    };
    let digits = token[at..].iter().take_while(|byte| byte.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut magnitude: u64 = 0;
    for &digit in &token[at..at + digits] {
        magnitude = magnitude.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
    }
    match token.get(at + digits) {
        Some(&next) if !is_c_space(next) => None,
        _ => Some(Scanned { negative, magnitude }),
    }
}

/// `safe_strtoull`: cas uniques and incr/decr deltas.
pub fn unsigned64(token: &[u8]) -> Option<u64> {
    let Scanned { negative, magnitude } = scan(token)?;
    let value = if negative { magnitude.wrapping_neg() } else { magnitude };
    if negative && (value as i64) < 0 {
        return None;
    }
    Some(value)
}

/// `safe_strtoul` into a 32-bit field: client flags, verbosity levels.
pub fn unsigned32(token: &[u8]) -> Option<u32> {
    unsigned64(token).map(|value| value as u32)
}

/// `safe_strtol` into a 32-bit field: exptimes, flush delays, data lengths.
pub fn signed32(token: &[u8]) -> Option<i32> {
    let Scanned { negative, magnitude } = scan(token)?;
    let value: i64 = if negative {
        // strtol's range ends at -2^63.
        0i64.checked_sub_unsigned(magnitude)?
    } else {
        i64::try_from(magnitude).ok()?
    };
    Some(value as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers() {
        assert_eq!(unsigned64(b"0"), Some(0));
        assert_eq!(unsigned64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(unsigned32(b"4294967295"), Some(u32::MAX));
        assert_eq!(signed32(b"-1"), Some(-1));
        assert_eq!(signed32(b"2147483647"), Some(i32::MAX));
    }

    #[test]
    fn refused_like_memcached() {
        for token in [&b""[..], b"x", b"5x", b"-", b"+", b" ", b"\t", b"0x10", b"--1", b"+-1", b"1.5"] {
            assert_eq!(unsigned64(token), None, "{:?}", token.escape_ascii().to_string());
            assert_eq!(signed32(token), None, "{:?}", token.escape_ascii().to_string());
        }
        assert_eq!(unsigned64(b"18446744073709551616"), None);
        assert_eq!(unsigned64(b"-1"), None);
        assert_eq!(unsigned32(b"-5"), None);
        assert_eq!(signed32(b"9223372036854775808"), None);
        assert_eq!(signed32(b"-9223372036854775809"), None);
    }

    #[test]
    fn c_quirks_are_kept() {
        assert_eq!(unsigned64(b"+5"), Some(5));
        assert_eq!(unsigned64(b"-0"), Some(0));
        assert_eq!(unsigned64(b"\t5"), Some(5));
        assert_eq!(unsigned64(b"5\t"), Some(5));
        assert_eq!(unsigned64(b"5\rjunk"), Some(5));
        // Wrapped far enough that it no longer looks negative: accepted, as strtoull does.
        assert_eq!(unsigned64(b"-18446744073709551615"), Some(1));
        assert_eq!(unsigned32(b"4294967296"), Some(0));
        assert_eq!(unsigned32(b"18446744073709551615"), Some(u32::MAX));
        assert_eq!(signed32(b"4294967296"), Some(0));
        assert_eq!(signed32(b"4294967306"), Some(10));
        assert_eq!(signed32(b"2147483648"), Some(i32::MIN));
        assert_eq!(signed32(b"-2147483649"), Some(i32::MAX));
        assert_eq!(signed32(b"-9223372036854775808"), Some(0));
    }
}
