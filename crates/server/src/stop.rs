//! Stop strings, matched on the detokenized text as it streams.
//!
//! A stop string can be split across any number of tokens, so the matcher
//! holds back the shortest tail of the text that could still grow into a stop
//! string and releases it only once it cannot. The stop string itself is
//! never released: OpenAI's API returns the text before it.

use batching_types::StopCondition;

use crate::text_model::StreamDecoder;

/// Stop strings as the engine checks them, token by token as it delivers
/// them: the same decoding and matching as the response's own, run on the
/// engine thread, so that a match ends the request before another step is
/// planned and counts as a stop, not as a client going away.
pub struct StopStrings {
    decoder: Box<dyn StreamDecoder>,
    matcher: StopMatcher,
    eos: Vec<u32>,
}

impl StopStrings {
    /// Checks `stops` on the text `decoder` makes of the tokens; `eos`
    /// tokens are no text (the engine stops on them by itself).
    pub fn new(decoder: Box<dyn StreamDecoder>, stops: Vec<String>, eos: Vec<u32>) -> Self {
        Self {
            decoder,
            matcher: StopMatcher::new(stops),
            eos,
        }
    }
}

impl StopCondition for StopStrings {
    fn on_token(&mut self, token: u32) -> bool {
        if self.eos.contains(&token) {
            return false;
        }
        // A token that cannot be decoded is reported by the response's own
        // reader; here it simply matches nothing.
        let Ok(text) = self.decoder.push(token) else {
            return false;
        };
        matches!(self.matcher.push(&text), StopOutcome::Stopped(_))
    }
}

/// What [`StopMatcher::push`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string yet; this text is safe to send (it may be empty when
    /// everything new is held back).
    Continue(String),
    /// A stop string was found; this is the text before it, and generation
    /// must end.
    Stopped(String),
}

/// Finds the first occurrence of any stop string in streamed text.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored because they would
    /// match before any text.
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Adds newly decoded text and returns what can be released.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        let hold_from = self.hold_start();
        match self.first_match() {
            // A longer stop string that starts earlier may still complete,
            // and it would cut the text sooner: wait for more text.
            Some(at) if hold_from >= at => self.stop_at(at),
            _ => {
                let released = self.pending[..hold_from].to_owned();
                self.pending.drain(..hold_from);
                StopOutcome::Continue(released)
            }
        }
    }

    /// Ends the text when generation ends for another reason: a complete
    /// stop string still cuts it, and a partial one is released as text.
    pub fn finish(&mut self) -> StopOutcome {
        match self.first_match() {
            Some(at) => self.stop_at(at),
            None => StopOutcome::Continue(std::mem::take(&mut self.pending)),
        }
    }

    fn stop_at(&mut self, at: usize) -> StopOutcome {
        let before = self.pending[..at].to_owned();
        self.pending.clear();
        StopOutcome::Stopped(before)
    }

    /// The byte offset of the earliest stop string in the pending text.
    fn first_match(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()))
            .min()
    }

    /// Where the longest tail of the pending text that is a proper prefix of
    /// some stop string begins (on a character boundary); the pending
    /// length when there is none.
    fn hold_start(&self) -> usize {
        let text = self.pending.as_str();
        text.char_indices()
            .map(|(start, _)| start)
            .find(|&start| {
                let tail = &text[start..];
                self.stops
                    .iter()
                    .any(|stop| stop.len() > tail.len() && stop.starts_with(tail))
            })
            .unwrap_or(text.len())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;

    use super::*;

    /// Feeds `chunks` and returns the released text and whether it stopped.
    fn run(stops: &[&str], chunks: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| (*s).to_owned()));
        let mut out = String::new();
        for chunk in chunks {
            match m.push(chunk) {
                StopOutcome::Continue(text) => out.push_str(&text),
                StopOutcome::Stopped(text) => {
                    out.push_str(&text);
                    return (out, true);
                }
            }
        }
        match m.finish() {
            StopOutcome::Continue(text) => {
                out.push_str(&text);
                (out, false)
            }
            StopOutcome::Stopped(text) => {
                out.push_str(&text);
                (out, true)
            }
        }
    }

    #[test]
    fn a_stop_string_inside_one_chunk_cuts_the_text_before_it() {
        assert_eq!(run(&["END"], &["abcENDdef"]), ("abc".to_owned(), true));
    }

    #[test]
    fn a_stop_string_split_across_tokens_is_found() {
        assert_eq!(
            run(&["\n\nUser:"], &["Hi", "\n", "\nUs", "er", ":", "more"]),
            ("Hi".to_owned(), true)
        );
    }

    #[test]
    fn held_back_text_is_released_once_it_cannot_match() {
        let mut m = StopMatcher::new(["abc".to_owned()]);
        assert_eq!(m.push("xa"), StopOutcome::Continue("x".to_owned()));
        assert_eq!(m.push("b"), StopOutcome::Continue(String::new()));
        assert_eq!(m.push("d"), StopOutcome::Continue("abd".to_owned()));
    }

    #[test]
    fn a_longer_stop_string_that_starts_earlier_is_awaited() {
        assert_eq!(
            run(&["abcd", "c"], &["ab", "c", "d"]),
            (String::new(), true)
        );
        assert_eq!(
            run(&["abcd", "c"], &["ab", "c", "x"]),
            ("ab".to_owned(), true)
        );
        assert_eq!(run(&["abcd", "c"], &["abc"]), ("ab".to_owned(), true));
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        assert_eq!(
            run(&["world", "lo"], &["hello world"]),
            ("hel".to_owned(), true)
        );
    }

    #[test]
    fn finish_releases_a_partial_match_and_empty_stops_are_ignored() {
        assert_eq!(run(&["xyz", ""], &["abx", "y"]), ("abxy".to_owned(), false));
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        assert_eq!(
            run(&["éz"], &["caf", "é", "!"]),
            ("café!".to_owned(), false)
        );
        assert_eq!(run(&["😀"], &["a😀b"]), ("a".to_owned(), true));
    }

    proptest! {
        /// However the text is cut into chunks, the matcher releases exactly
        /// the text before the first stop string, or all of it.
        #[test]
        fn chunking_never_changes_the_result(
            text in "[ab😀]{0,24}",
            stops in proptest::collection::vec("[ab😀]{1,4}", 1..3),
            cuts in proptest::collection::vec(0usize..32, 0..8),
        ) {
            let mut bounds: Vec<usize> = cuts
                .into_iter()
                .map(|c| c.min(text.len()))
                .filter(|&c| text.is_char_boundary(c))
                .collect();
            bounds.push(0);
            bounds.push(text.len());
            bounds.sort_unstable();
            bounds.dedup();
            let chunks: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();
            let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            let first = stops.iter().filter_map(|s| text.find(s.as_str())).min();
            let expected = match first {
                Some(at) => (text[..at].to_owned(), true),
                None => (text.clone(), false),
            };
            prop_assert_eq!(run(&stop_refs, &chunks), expected);
        }
    }
}
