//! Decimal numbers as incr/decr see them: parsing a stored value the way memcached's `safe_strtoull`
//! does, and formatting the result without allocating.

/// Longest decimal u64 (`18446744073709551615`).
pub const MAX_DIGITS: usize = 20;

/// C's `isspace` in the C locale.
#[inline]
fn is_c_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Parses a stored value as memcached does for incr/decr (`strtoull` base 10, then its checks):
/// leading whitespace and one sign are skipped, at least one digit is required, the number must fit
/// in 64 bits (any count of leading zeros is fine), and the digits must end the value or be followed
/// by whitespace (what follows that is ignored). A minus sign is accepted only when the negated value
/// still looks non-negative as a signed number (`-0` is 0), as in memcached.
pub fn parse_u64(text: &[u8]) -> Option<u64> {
    let mut at = text.iter().position(|&b| !is_c_space(b)).unwrap_or(text.len());
    let mut negative = false;
    if let Some(&sign @ (b'+' | b'-')) = text.get(at) {
        negative = sign == b'-';
        at += 1;
    }
    let digits_start = at;
    let mut value: u64 = 0;
    let mut overflow = false;
    while let Some(&byte) = text.get(at).filter(|b| b.is_ascii_digit()) {
        match value.checked_mul(10).and_then(|v| v.checked_add((byte - b'0') as u64)) {
            Some(next) => value = next,
            None => overflow = true,
        }
        at += 1;
    }
    if at == digits_start || overflow {
        return None;
    }
    if text.get(at).is_some_and(|&b| !is_c_space(b)) {
        return None;
    }
    if negative {
        value = value.wrapping_neg();
        if (value as i64) < 0 {
            return None;
        }
    }
    Some(value)
}

/// Writes `value` in decimal into `buf`; returns the digits.
pub fn format_u64(value: u64, buf: &mut [u8; MAX_DIGITS]) -> &[u8] {
    let mut at = MAX_DIGITS;
    let mut rest = value;
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &buf[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case was checked against memcached 1.6.18 (`set` then `incr k 1`).
    #[test]
    fn parses_what_memcached_accepts() {
        assert_eq!(parse_u64(b"0000000000000000000001"), Some(1));
        assert_eq!(parse_u64(b"1   "), Some(1));
        assert_eq!(parse_u64(b" 12"), Some(12));
        assert_eq!(parse_u64(b"\t12"), Some(12));
        assert_eq!(parse_u64(b"+12"), Some(12));
        assert_eq!(parse_u64(b"12 abc"), Some(12));
        assert_eq!(parse_u64(b"-0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"-12"), None);
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b" "), None);
        assert_eq!(parse_u64(b"12a"), None);
        assert_eq!(parse_u64(b"-"), None);
        assert_eq!(parse_u64(b"abc"), None);
        // strtoull negates modulo 2^64; memcached only rejects results that look negative.
        assert_eq!(parse_u64(b"-18446744073709551615"), Some(1));
    }

    #[test]
    fn formats_without_padding() {
        let mut buf = [0; MAX_DIGITS];
        assert_eq!(format_u64(0, &mut buf), b"0");
        assert_eq!(format_u64(1234, &mut buf), b"1234");
        assert_eq!(format_u64(u64::MAX, &mut buf), b"18446744073709551615");
    }
}
