//! A bounds-checked little-endian reader over the bytes of a GGUF file.

/// A parse problem at a byte offset; the reader turns it into an
/// [`crate::ImportError::Malformed`] that also names the file.
#[derive(Debug)]
pub(crate) struct Fault {
    pub offset: u64,
    pub reason: String,
}

/// Reads fixed-size values and length-prefixed strings, failing (never
/// panicking) when the file ends early.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// The current offset from the start of the file.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes left after the current offset.
    pub fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    /// A fault at the current offset.
    pub fn fault(&self, reason: impl Into<String>) -> Fault {
        Fault {
            offset: self.pos as u64,
            reason: reason.into(),
        }
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Fault> {
        if n > self.remaining() {
            return Err(self.fault(format!(
                "file ends early: needed {n} bytes, {} left",
                self.remaining()
            )));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Fault> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, Fault> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Fault> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, Fault> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, Fault> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub fn f32(&mut self) -> Result<f32, Fault> {
        Ok(f32::from_le_bytes(self.array()?))
    }

    pub fn f64(&mut self) -> Result<f64, Fault> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    /// A count that must describe at most `remaining / min_item_bytes`
    /// items, so that a bogus count can never cause a huge allocation.
    pub fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, Fault> {
        let start = self.pos;
        let n = self.u64()?;
        let limit = self.remaining() / min_item_bytes.max(1);
        match usize::try_from(n) {
            Ok(n) if n <= limit => Ok(n),
            _ => Err(Fault {
                offset: start as u64,
                reason: format!(
                    "{what} count {n} cannot fit in the {} bytes left",
                    self.remaining()
                ),
            }),
        }
    }

    /// A `u64` length followed by that many bytes of UTF-8.
    pub fn string(&mut self) -> Result<String, Fault> {
        let len = self.count("string length", 1)?;
        let start = self.pos;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Fault {
            offset: start as u64,
            reason: "string is not valid UTF-8".to_owned(),
        })
    }
}
