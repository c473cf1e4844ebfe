//! Typed access to GGUF metadata with errors that name the file and key.

use std::collections::BTreeMap;
use std::path::Path;

use crate::gguf::MetaValue;
use crate::ImportError;

/// A view of a metadata table that reports missing or mistyped keys.
pub struct Meta<'a> {
    pub path: &'a Path,
    pub map: &'a BTreeMap<String, MetaValue>,
}

impl<'a> Meta<'a> {
    fn bad(&self, key: &str, reason: impl Into<String>) -> ImportError {
        ImportError::BadMetadata {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn missing(&self, key: &str) -> ImportError {
        ImportError::MissingMetadata {
            path: self.path.to_path_buf(),
            key: key.to_owned(),
        }
    }

    /// The raw value, if present.
    pub fn get(&self, key: &str) -> Option<&'a MetaValue> {
        self.map.get(key)
    }

    /// An optional non-negative integer that fits in `usize`.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ImportError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.bad(key, format!("{v:?} is not a non-negative integer")))
            })
            .transpose()
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize, ImportError> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    /// A required positive integer.
    pub fn positive(&self, key: &str) -> Result<usize, ImportError> {
        match self.usize(key)? {
            0 => Err(self.bad(key, "must be positive")),
            n => Ok(n),
        }
    }

    /// An optional finite number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, ImportError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| self.bad(key, format!("{v:?} is not a finite number")))
            })
            .transpose()
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ImportError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.bad(key, "is not a string")))
            .transpose()
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&'a str, ImportError> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// An optional bool.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ImportError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.bad(key, "is not a bool")))
            .transpose()
    }

    /// An optional array of strings.
    pub fn opt_strings(&self, key: &str) -> Result<Option<Vec<&'a str>>, ImportError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| self.bad(key, "is not an array"))?;
        items
            .iter()
            .map(|i| {
                i.as_str()
                    .ok_or_else(|| self.bad(key, "has a non-string element"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// An optional array of integers.
    pub fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>, ImportError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| self.bad(key, "is not an array"))?;
        items
            .iter()
            .map(|i| match *i {
                MetaValue::I32(n) => Ok(i64::from(n)),
                MetaValue::I64(n) => Ok(n),
                ref other => other
                    .as_u64()
                    .and_then(|n| i64::try_from(n).ok())
                    .ok_or_else(|| self.bad(key, "has a non-integer element")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}
