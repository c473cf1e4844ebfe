//! Deterministic prompts of a roughly known length in tokens.
//!
//! Every word in the list is a common lower-case English word that byte-level
//! BPE tokenizers (GPT-2, Llama 3, SmolLM2 and their kin) encode as a single
//! token when preceded by a space, so `n` words make close to `n` tokens. Each
//! prompt draws its words from its own seed, so no two prompts share a long
//! prefix and a server's prefix cache cannot make one look faster.

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Words that are one token each, with a leading space, in common BPE vocabularies.
const WORDS: &[&str] = &[
    "the",
    "time",
    "people",
    "year",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "good",
    "new",
    "first",
    "last",
    "long",
    "great",
    "little",
    "own",
    "other",
    "old",
    "big",
    "high",
    "different",
    "small",
    "large",
    "next",
    "early",
    "young",
    "important",
    "few",
    "public",
    "bad",
    "same",
    "able",
    "green",
    "blue",
    "red",
    "white",
    "black",
    "light",
    "open",
    "small",
];

/// The instruction that opens every prompt, so chat models answer at length.
const PREAMBLE: &str = "Write a long story that uses these words:";

/// Builds a prompt of about `tokens` tokens from `seed`; the same seed and
/// length always give the same text.
pub fn build_prompt(tokens: u32, seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    // The preamble is about 9 tokens; the rest are one word each.
    let words = tokens.saturating_sub(9).max(1);
    let mut text = String::with_capacity(PREAMBLE.len() + words as usize * 8);
    text.push_str(PREAMBLE);
    for _ in 0..words {
        text.push(' ');
        text.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_deterministic_and_sized() {
        let a = build_prompt(100, 3);
        assert_eq!(a, build_prompt(100, 3));
        assert_ne!(a, build_prompt(100, 4));
        // The preamble has 9 whitespace-separated pieces of text, then one
        // piece per word: the word count tracks the requested token count.
        assert_eq!(a.split_whitespace().count(), 8 + 91);
        assert!(build_prompt(1, 0).len() > PREAMBLE.len());
    }
}
