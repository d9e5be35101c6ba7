//! What a run asks for: the command mix (`--ratio set=1,get=10`), the value sizes (`32` or
//! `uniform:10-1000`), the key space and its key names, the value bytes, and a small fast PRNG.
//!
//! Values are a pure function of (key index, size) so any reader can check any value it gets back.

use std::fmt;
use std::str::FromStr;

use super::protocol::OpKind;

/// Weights of set, get, touch and delete, parsed from `set=1,get=10`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ratio {
    weights: [(OpKind, u32); 4],
    total: u32,
}

impl FromStr for Ratio {
    type Err = String;

    fn from_str(text: &str) -> Result<Ratio, String> {
        let mut weights = OpKind::ALL.map(|kind| (kind, 0));
        for part in text.split(',') {
            let (name, weight) = part.split_once('=').ok_or_else(|| format!("{part:?}: expected name=weight"))?;
            let slot = weights
                .iter_mut()
                .find(|(kind, _)| kind.name() == name.trim())
                .ok_or_else(|| format!("{name:?}: not one of set, get, touch, delete"))?;
            slot.1 = weight.trim().parse().map_err(|_| format!("{weight:?}: not a whole number"))?;
        }
        let total = weights.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return Err("all weights are zero".into());
        }
        Ok(Ratio { weights, total })
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> =
            self.weights.iter().filter(|(_, w)| *w > 0).map(|(kind, w)| format!("{}={w}", kind.name())).collect();
        f.write_str(&parts.join(","))
    }
}

impl Ratio {
    /// The weight given to `kind` (0 when the ratio does not name it).
    pub fn weight(&self, kind: OpKind) -> u32 {
        self.weights.iter().find(|(k, _)| *k == kind).map_or(0, |(_, w)| *w)
    }

    pub fn pick(&self, rng: &mut Rng) -> OpKind {
        let mut ticket = rng.below(self.total as u64) as u32;
        for (kind, weight) in self.weights {
            if ticket < weight {
                return kind;
            }
            ticket -= weight;
        }
        unreachable!("ticket below the total weight")
    }
}

/// Value sizes: a fixed size or uniform over an inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueSize {
    Fixed(usize),
    Uniform { min: usize, max: usize },
}

impl FromStr for ValueSize {
    type Err = String;

    fn from_str(text: &str) -> Result<ValueSize, String> {
        let number = |s: &str| s.trim().parse::<usize>().map_err(|_| format!("{s:?}: not a size in bytes"));
        if let Some(range) = text.strip_prefix("uniform:") {
            let (min, max) = range.split_once('-').ok_or_else(|| format!("{range:?}: expected MIN-MAX"))?;
            let (min, max) = (number(min)?, number(max)?);
            if min > max {
                return Err(format!("uniform:{min}-{max}: MIN above MAX"));
            }
            return Ok(ValueSize::Uniform { min, max });
        }
        number(text).map(ValueSize::Fixed)
    }
}

impl fmt::Display for ValueSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueSize::Fixed(size) => write!(f, "{size}"),
            ValueSize::Uniform { min, max } => write!(f, "uniform:{min}-{max}"),
        }
    }
}

impl ValueSize {
    pub fn sample(&self, rng: &mut Rng) -> usize {
        match *self {
            ValueSize::Fixed(size) => size,
            ValueSize::Uniform { min, max } => min + rng.below((max - min + 1) as u64) as usize,
        }
    }

    pub fn max(&self) -> usize {
        match *self {
            ValueSize::Fixed(size) => size,
            ValueSize::Uniform { max, .. } => max,
        }
    }
}

/// Key names `k000…0123` of a fixed length, over a key space of `count` keys.
#[derive(Clone, Copy, Debug)]
pub struct KeySpace {
    pub count: u64,
    pub length: usize,
}

impl KeySpace {
    pub fn new(count: u64, length: usize) -> Result<KeySpace, String> {
        let digits = count.saturating_sub(1).max(1).ilog10() as usize + 1;
        if count == 0 {
            return Err("the key space is empty".into());
        }
        if length < digits + 1 || length > 250 {
            return Err(format!("key length {length}: needs {} to 250 for {count} keys", digits + 1));
        }
        Ok(KeySpace { count, length })
    }

    /// Writes key `index` into `out` (cleared first).
    /// Runs once per request in the load loop (it was 10% of the client's samples when it filled a
    /// 250-byte scratch array each time): only the key's own bytes are written, digits until none are left.
    pub fn write(&self, index: u64, out: &mut Vec<u8>) {
        out.clear();
        out.resize(self.length, b'0');
        out[0] = b'k';
        let mut rest = index;
        for slot in out[1..].iter_mut().rev() {
            if rest == 0 {
                break;
            }
            *slot = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
    }

    pub fn name(&self, index: u64) -> String {
        let mut key = Vec::new();
        self.write(index, &mut key);
        String::from_utf8(key).expect("keys are ASCII")
    }
}

/// The value stored under key `index` at `size` bytes: printable, different per key and per offset.
pub fn value_bytes(index: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    let mut rng = Rng::new(index ^ (size as u64).rotate_left(32));
    while out.len() < size {
        let word = rng.next_u64();
        for byte in word.to_le_bytes() {
            if out.len() == size {
                break;
            }
            out.push(b'!' + byte % 94);
        }
    }
}

/// splitmix64: tiny, fast, good enough to pick keys and commands.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (bound > 0), by multiply-shift.
    pub fn below(&mut self, bound: u64) -> u64 {
        ((self.next_u64() as u128 * bound as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_parse_and_pick_in_proportion() {
        let ratio: Ratio = "set=1,get=10".parse().unwrap();
        assert_eq!(ratio.to_string(), "set=1,get=10");
        let mut rng = Rng::new(1);
        let sets = (0..110_000).filter(|_| ratio.pick(&mut rng) == OpKind::Set).count();
        assert!((9_000..11_000).contains(&sets), "{sets}");
        assert!("set=1,put=2".parse::<Ratio>().is_err());
        assert!("get=0".parse::<Ratio>().is_err());
    }

    #[test]
    fn sizes_and_keys() {
        assert_eq!("32".parse(), Ok(ValueSize::Fixed(32)));
        assert_eq!("uniform:10-1000".parse(), Ok(ValueSize::Uniform { min: 10, max: 1000 }));
        assert!("uniform:10-5".parse::<ValueSize>().is_err());
        let keys = KeySpace::new(1000, 8).unwrap();
        assert_eq!(keys.name(42), "k0000042");
        assert_eq!(keys.name(0), "k0000000");
        assert_eq!(keys.name(999), "k0000999");
        assert_eq!(KeySpace::new(100_000, 16).unwrap().name(99_999), "k000000000099999");
        assert!(KeySpace::new(100_000, 4).is_err());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        value_bytes(1, 100, &mut a);
        value_bytes(2, 100, &mut b);
        assert_eq!(a.len(), 100);
        assert_ne!(a, b);
    }
}
