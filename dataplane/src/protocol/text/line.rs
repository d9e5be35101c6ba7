//! A command line and its tokens, cut the way memcached cuts them.
//!
//! memcached ends a line at the first `\n` (dropping one `\r` before it), stops reading it at the first
//! NUL (its tokenizer runs `strlen`), and splits it on spaces only: a tab is part of a token, so
//! `get\tkey` is one unknown command and `set a\tb 0 0 1` stores the key `a\tb`.

use std::ops::Range;

/// The line at the front of `buf`, if its newline has arrived: the bytes memcached tokenizes, and how
/// many bytes of `buf` the line occupies (terminator included).
pub fn split_line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let newline = buf.iter().position(|&byte| byte == b'\n')?;
    // memcached only drops the `\r` of a line longer than one byte: "\r\n" stays "\r" (an error anyway).
    let end = if newline > 1 && buf[newline - 1] == b'\r' { newline - 1 } else { newline };
    let line = &buf[..end];
    let line = match line.iter().position(|&byte| byte == 0) {
        Some(nul) => &line[..nul],
        None => line,
    };
    Some((line, newline + 1))
}

/// The space-separated tokens of a line, as ranges of it.
#[derive(Clone)]
pub struct Tokens<'a> {
    line: &'a [u8],
    at: usize,
}

impl<'a> Tokens<'a> {
    pub fn new(line: &'a [u8]) -> Tokens<'a> {
        Tokens { line, at: 0 }
    }

    /// The next token's place in the line.
    pub fn next_span(&mut self) -> Option<Range<usize>> {
        let rest = &self.line[self.at..];
        let start = self.at + rest.iter().position(|&byte| byte != b' ')?;
        let len = self.line[start..].iter().position(|&byte| byte == b' ').unwrap_or(self.line.len() - start);
        self.at = start + len;
        Some(start..start + len)
    }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let line = self.line;
        self.next_span().map(|span| &line[span])
    }
}

/// Most tokens any command other than a retrieval looks at (`cas` has 7 and an optional 8th would
/// already be one too many); further ones are counted, not kept.
pub const FIXED_TOKENS: usize = 8;

/// The first [`FIXED_TOKENS`] tokens of a line and how many there are in all.
pub struct FixedTokens<'a> {
    tokens: [&'a [u8]; FIXED_TOKENS],
    count: usize,
}

impl<'a> FixedTokens<'a> {
    pub fn new(line: &'a [u8]) -> FixedTokens<'a> {
        let mut tokens: [&[u8]; FIXED_TOKENS] = [&[]; FIXED_TOKENS];
        let mut count = 0;
        for token in Tokens::new(line) {
            if let Some(slot) = tokens.get_mut(count) {
                *slot = token;
            }
            count += 1;
        }
        FixedTokens { tokens, count }
    }

    /// Number of tokens, the command included.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Token `index` (the command is 0); empty past the end.
    pub fn get(&self, index: usize) -> &'a [u8] {
        self.tokens.get(index).copied().unwrap_or_default()
    }

    /// The last token, where memcached looks for `noreply`.
    pub fn last(&self) -> &'a [u8] {
        self.get(self.count.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_end_like_memcached() {
        assert_eq!(split_line(b"get a\r\nrest"), Some((&b"get a"[..], 7)));
        assert_eq!(split_line(b"get a\nrest"), Some((&b"get a"[..], 6)));
        assert_eq!(split_line(b"get a\r\r\n"), Some((&b"get a\r"[..], 8)));
        assert_eq!(split_line(b"\r\n"), Some((&b"\r"[..], 2)));
        assert_eq!(split_line(b"\n"), Some((&b""[..], 1)));
        assert_eq!(split_line(b"get a\0b c\r\n"), Some((&b"get a"[..], 11)));
        assert_eq!(split_line(b"get a\r"), None);
    }

    #[test]
    fn tokens_split_on_spaces_only() {
        let tokens: Vec<&[u8]> = Tokens::new(b"  get a\tb   c ").collect();
        assert_eq!(tokens, [&b"get"[..], b"a\tb", b"c"]);
        assert_eq!(Tokens::new(b"   ").count(), 0);
        let fixed = FixedTokens::new(b"a b c d e f g h i j");
        assert_eq!(fixed.count(), 10);
        assert_eq!(fixed.get(7), b"h");
        assert_eq!(fixed.get(8), b"");
        assert_eq!(fixed.last(), b"");
        assert_eq!(FixedTokens::new(b"x y").last(), b"y");
    }
}
