//! Byte sizes for command-line flags: `512MiB`, `1GiB`, `64KiB`, `1048576`.

use std::{fmt, str::FromStr};

/// A number of bytes, parsed from a human-friendly string.
///
/// Accepts a plain byte count (`1048576`) or a number with a unit (`512MiB`,
/// `1.5GiB`, `64KB`); binary units (KiB, MiB, GiB) are powers of 1024,
/// decimal ones (KB, MB, GB) powers of 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty size; expected a byte count such as 512MiB".to_owned());
        }
        s.parse::<bytesize::ByteSize>()
            .map(|b| ByteSize(b.as_u64()))
            .map_err(|e| format!("{e}; expected a byte count such as 512MiB, 64KiB or 1048576"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!("512MiB".parse(), Ok(ByteSize(512 << 20)));
        assert_eq!("1GiB".parse(), Ok(ByteSize(1 << 30)));
        assert_eq!("64KiB".parse(), Ok(ByteSize(64 << 10)));
        assert_eq!("1048576".parse(), Ok(ByteSize(1 << 20)));
        assert_eq!("1KB".parse(), Ok(ByteSize(1000)));
        assert_eq!(" 2 MiB ".parse(), Ok(ByteSize(2 << 20)));
    }

    #[test]
    fn rejects_garbage() {
        assert!("".parse::<ByteSize>().is_err());
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("12parsecs".parse::<ByteSize>().is_err());
    }

    #[test]
    fn displays_iec() {
        assert_eq!(ByteSize(512 << 20).to_string(), "512.0 MiB");
    }
}
