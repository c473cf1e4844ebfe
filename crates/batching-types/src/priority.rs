//! Request priorities.

use std::{fmt, str::FromStr};

use crate::TypesError;

/// How urgent a request is; a lower value is served first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Priority {
    /// Served before everything else that has not aged past it.
    High = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Background work; still served thanks to aging.
    Low = 2,
}

impl Priority {
    /// All priorities, most urgent first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The numeric value: HIGH=0, NORMAL=1, LOW=2.
    pub fn value(self) -> u8 {
        self as u8
    }

    /// The lower-case name, as clients spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = TypesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| TypesError::InvalidPriority(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::Priority;

    #[test]
    fn values_order_high_first() {
        assert_eq!(Priority::High.value(), 0);
        assert_eq!(Priority::Normal.value(), 1);
        assert_eq!(Priority::Low.value(), 2);
        assert!(Priority::High < Priority::Normal && Priority::Normal < Priority::Low);
    }

    #[test]
    fn parses_case_insensitively_and_round_trips() {
        for (text, p) in [
            ("high", Priority::High),
            ("HIGH", Priority::High),
            ("Normal", Priority::Normal),
            (" low ", Priority::Low),
        ] {
            assert_eq!(text.parse::<Priority>(), Ok(p));
        }
        for p in Priority::ALL {
            assert_eq!(p.to_string().parse::<Priority>(), Ok(p));
        }
    }

    #[test]
    fn unknown_names_give_a_clear_error() {
        let err = "urgent".parse::<Priority>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid priority \"urgent\": expected one of \"high\", \"normal\", \"low\""
        );
        assert!("".parse::<Priority>().is_err());
        assert!("0".parse::<Priority>().is_err());
    }
}
