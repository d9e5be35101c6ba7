//! The keys of a multi-key retrieval (`get a b c`), kept as places in its command line.
//!
//! Up to [`INLINE_KEYS`] keys are held in place, so the common request allocates nothing; a larger
//! multiget puts its places on the heap once (memcached, too, switches to a grown buffer for those).
//! [`KeyList::get`] is O(1) either way.

use std::fmt;

use super::line::Tokens;
use crate::store::MAX_KEY_LEN;

/// Keys held without allocating.
pub const INLINE_KEYS: usize = 24;

/// Where a key is in its line. Keys are at most [`MAX_KEY_LEN`] bytes, which fits a `u8`.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct KeySpan {
    start: u32,
    len: u8,
}

#[derive(Clone)]
enum Spans {
    Inline { count: u8, spans: [KeySpan; INLINE_KEYS] },
    Heap(Vec<KeySpan>),
}

/// The keys of one retrieval, borrowed from its command line.
#[derive(Clone)]
pub struct KeyList<'a> {
    line: &'a [u8],
    spans: Spans,
}

/// A key longer than [`MAX_KEY_LEN`]: the whole line is refused.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyTooLong;

const _: () = assert!(MAX_KEY_LEN <= u8::MAX as usize);

impl<'a> KeyList<'a> {
    /// The keys left in `tokens` (a cursor over `line` past the command and its arguments).
    /// `line` must be shorter than 4 GiB.
    pub fn from_tokens(line: &'a [u8], mut tokens: Tokens<'a>) -> Result<KeyList<'a>, KeyTooLong> {
        debug_assert!(line.len() <= u32::MAX as usize);
        let mut count = 0usize;
        let mut inline = [KeySpan::default(); INLINE_KEYS];
        let mut heap: Vec<KeySpan> = Vec::new();
        while let Some(span) = tokens.next_span() {
            if !crate::protocol::key_token_ok(&line[span.clone()]) {
                return Err(KeyTooLong);
            }
            let key = KeySpan { start: span.start as u32, len: span.len() as u8 };
            if count < INLINE_KEYS {
                inline[count] = key;
            } else {
                if heap.is_empty() {
                    heap.reserve(2 * INLINE_KEYS);
                    heap.extend_from_slice(&inline);
                }
                heap.push(key);
            }
            count += 1;
        }
        let spans =
            if count <= INLINE_KEYS { Spans::Inline { count: count as u8, spans: inline } } else { Spans::Heap(heap) };
        Ok(KeyList { line, spans })
    }

    fn spans(&self) -> &[KeySpan] {
        match &self.spans {
            Spans::Inline { count, spans } => &spans[..*count as usize],
            Spans::Heap(spans) => spans,
        }
    }

    pub fn len(&self) -> usize {
        self.spans().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Key `index`. Panics past the end.
    pub fn get(&self, index: usize) -> &'a [u8] {
        let KeySpan { start, len } = self.spans()[index];
        let start = start as usize;
        &self.line[start..start + len as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        (0..self.len()).map(|index| self.get(index))
    }
}

impl fmt::Debug for KeyList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter().map(|key| key.escape_ascii().to_string())).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(line: &[u8]) -> Result<Vec<Vec<u8>>, KeyTooLong> {
        let mut tokens = Tokens::new(line);
        tokens.next();
        Ok(KeyList::from_tokens(line, tokens)?.iter().map(<[u8]>::to_vec).collect())
    }

    #[test]
    fn few_and_many_keys() {
        assert_eq!(keys(b"get").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(keys(b"get a  bb ").unwrap(), [b"a".to_vec(), b"bb".to_vec()]);
        for count in [INLINE_KEYS - 1, INLINE_KEYS, INLINE_KEYS + 1, 1000] {
            let wanted: Vec<Vec<u8>> = (0..count).map(|i| format!("key{i}").into_bytes()).collect();
            let line = [b"get ".to_vec(), wanted.join(&b' ')].concat();
            assert_eq!(keys(&line).unwrap(), wanted);
        }
    }

    #[test]
    fn a_long_key_refuses_the_line() {
        let long = vec![b'k'; MAX_KEY_LEN + 1];
        assert!(keys(&[b"get a ".to_vec(), long.clone()].concat()).is_err());
        assert_eq!(keys(&[b"get ".to_vec(), long[1..].to_vec()].concat()).unwrap()[0].len(), MAX_KEY_LEN);
    }
}
