//! Constrained decoding with llguidance: JSON objects, JSON schemas and
//! tool calls as grammars over the model's tokens.
//!
//! A [`GrammarCompiler`] is built once per model: it turns the vocabulary
//! into the byte strings llguidance matches against (a token trie) and
//! holds llguidance's `ParserFactory`. Each request compiles its own
//! [`Grammar`], a [`TokenConstraint`] that the backend asks for a mask
//! before sampling and tells the sampled token after.
//!
//! JSON is generated in the one layout Python's `json.dumps` writes (`", "`
//! and `": "`, no other whitespace): models are trained on that layout, and
//! a grammar that allowed free whitespace would let a small model pad
//! forever.

use std::collections::HashMap;

use batching_types::{ConstraintError, SharedConstraint, TokenConstraint};
use llguidance::{
    api::TopLevelGrammar,
    toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv},
    JsonCompileOptions, Matcher, ParserFactory,
};
use serde_json::{json, Value as Json};

use crate::{message::FunctionDefinition, tool_parse::ToolCallFormat, PromptError, Tokenizer};

/// Which tool calls a grammar allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// One or more calls, each of any of the functions (OpenAI's
    /// `"required"`; several calls are its parallel tool calls).
    Required,
    /// Exactly one call, of any of the functions (`"required"` with
    /// `parallel_tool_calls: false`).
    RequiredOne,
    /// Exactly one call of the named function.
    Named(String),
}

/// Compiles grammars for one model. Build it once at load; it is `Send +
/// Sync`, so request handlers can share it behind an `Arc`.
pub struct GrammarCompiler {
    factory: ParserFactory,
    /// Mask width in 32-bit words: the logits width, rounded up.
    words: usize,
    n_vocab: usize,
    /// Token ids of the tokenizer's special tokens by text, for writing
    /// tool-call markers that are special tokens as those tokens.
    special_ids: HashMap<String, TokenId>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("n_vocab", &self.n_vocab)
            .finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// A compiler over the tokenizer in `tokenizer_json` (the bytes of a
    /// `tokenizer.json`). `eos_token_ids` end generation (they are the
    /// only tokens allowed once a grammar is complete); `n_vocab` is the
    /// width of the model's logits, which may exceed the tokenizer's
    /// vocabulary: the ids past it are never allowed.
    pub fn new(
        tokenizer_json: &[u8],
        eos_token_ids: &[u32],
        n_vocab: usize,
    ) -> Result<Self, PromptError> {
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|source| {
            PromptError::LoadTokenizer {
                what: "for constrained decoding".to_owned(),
                source,
            }
        })?;
        Self::from_hf(&tokenizer, eos_token_ids, n_vocab)
    }

    /// A compiler over a loaded [`Tokenizer`]; see [`GrammarCompiler::new`].
    pub fn from_tokenizer(
        tokenizer: &Tokenizer,
        eos_token_ids: &[u32],
        n_vocab: usize,
    ) -> Result<Self, PromptError> {
        Self::from_hf(tokenizer.hf_tokenizer(), eos_token_ids, n_vocab)
    }

    /// A compiler over a vocabulary given as each token's bytes, for
    /// tokenizers that are not Hugging Face ones (a byte-level test model).
    /// `special_tokens` names the tokens no text can produce (markers such
    /// as `<tool_call>` when the vocabulary has them as single tokens); the
    /// rest of [`GrammarCompiler::new`] applies.
    pub fn from_token_bytes(
        token_bytes: Vec<Vec<u8>>,
        special_tokens: HashMap<String, u32>,
        eos_token_ids: &[u32],
        n_vocab: usize,
    ) -> Result<Self, PromptError> {
        let mut bytes = token_bytes;
        for (text, &id) in &special_tokens {
            let slot = bytes.get_mut(id as usize).ok_or_else(|| {
                PromptError::Vocabulary(format!(
                    "special token {text:?} has id {id}, outside the vocabulary"
                ))
            })?;
            let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            marked.extend_from_slice(text.as_bytes());
            *slot = marked;
        }
        let vocab = TokenBytes {
            bytes,
            special_ids: special_tokens,
        };
        Self::from_vocabulary(vocab, eos_token_ids, n_vocab)
    }

    fn from_hf(
        tokenizer: &tokenizers::Tokenizer,
        eos_token_ids: &[u32],
        n_vocab: usize,
    ) -> Result<Self, PromptError> {
        Self::from_vocabulary(TokenBytes::of(tokenizer)?, eos_token_ids, n_vocab)
    }

    fn from_vocabulary(
        vocab: TokenBytes,
        eos_token_ids: &[u32],
        n_vocab: usize,
    ) -> Result<Self, PromptError> {
        if vocab.bytes.len() > n_vocab {
            return Err(PromptError::Vocabulary(format!(
                "the tokenizer has {} ids but the logits only {n_vocab}",
                vocab.bytes.len()
            )));
        }
        let Some(&first_eos) = eos_token_ids.first() else {
            return Err(PromptError::Vocabulary(
                "no end-of-sequence token id was given".to_owned(),
            ));
        };
        if let Some(bad) = eos_token_ids.iter().find(|&&id| id as usize >= n_vocab) {
            return Err(PromptError::Vocabulary(format!(
                "end-of-sequence id {bad} is outside the {n_vocab} logits"
            )));
        }
        let mut words = vocab.bytes;
        // Ids past the tokenizer's vocabulary (padding of the embedding)
        // have no bytes, so no grammar ever allows them.
        words.resize(n_vocab, Vec::new());
        let info = TokRxInfo::new(n_vocab as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_token_ids);
        let env: TokEnv = std::sync::Arc::new(TrieEnv { trie });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| PromptError::GrammarSetup(e.into()))?;
        // llguidance would otherwise print grammar warnings on stderr.
        factory.quiet();
        Ok(Self {
            factory,
            words: n_vocab.div_ceil(32),
            n_vocab,
            special_ids: vocab.special_ids,
        })
    }

    /// The logits width the masks cover.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub fn json_object(&self) -> Result<Grammar, PromptError> {
        self.json_schema(&json!({"type": "object"}), false)
    }

    /// JSON that follows `schema` (`response_format: {"type":
    /// "json_schema"}`). With `strict`, every object schema that does not
    /// say otherwise gets `"additionalProperties": false`, as OpenAI's
    /// strict mode requires, so the output has no keys beyond those listed.
    pub fn json_schema(&self, schema: &Json, strict: bool) -> Result<Grammar, PromptError> {
        let what = "JSON schema";
        let schema = prepare_schema(schema, strict, what)?;
        self.compile(TopLevelGrammar::from_json_schema(schema), what)
    }

    /// A tool call in exactly the text `format` uses (what
    /// [`parse_tool_calls`](crate::parse_tool_calls) reads back), whose
    /// arguments follow the called function's `parameters` schema.
    pub fn tool_call(
        &self,
        format: ToolCallFormat,
        functions: &[FunctionDefinition],
        choice: &ToolChoice,
    ) -> Result<Grammar, PromptError> {
        let chosen: Vec<&FunctionDefinition> = match choice {
            ToolChoice::Required | ToolChoice::RequiredOne => functions.iter().collect(),
            ToolChoice::Named(name) => functions.iter().filter(|f| &f.name == name).collect(),
        };
        if chosen.is_empty() {
            return Err(PromptError::ToolChoice(match choice {
                ToolChoice::Required | ToolChoice::RequiredOne => {
                    "a tool call is required but no tools were given".into()
                }
                ToolChoice::Named(name) => {
                    format!("the named tool {name:?} is not among the tools")
                }
            }));
        }
        let calls = self.tool_call_lark(format, &chosen, choice == &ToolChoice::Required)?;
        let lark = format!("start: calls\n{calls}");
        self.compile(TopLevelGrammar::from_lark(lark), "tool-call grammar")
    }

    /// Either tool calls (one, or several with `parallel`) of any of
    /// `functions`, or a JSON answer that follows `schema`: what a request
    /// with tools left to the model (`"auto"`) and a `response_format`
    /// allows, so that an agent can either act or answer in its format.
    pub fn tool_call_or_json(
        &self,
        format: ToolCallFormat,
        functions: &[FunctionDefinition],
        parallel: bool,
        schema: &Json,
        strict: bool,
    ) -> Result<Grammar, PromptError> {
        if functions.is_empty() {
            return Err(PromptError::ToolChoice(
                "tool calls or JSON were asked for but no tools were given".into(),
            ));
        }
        let chosen: Vec<&FunctionDefinition> = functions.iter().collect();
        let calls = self.tool_call_lark(format, &chosen, parallel)?;
        let what = "JSON schema";
        let schema = prepare_schema(schema, strict, what)?;
        // Compiled alone first, so that a bad schema is reported as the
        // response format's rather than as a line of the whole grammar.
        self.compile(TopLevelGrammar::from_json_schema(schema.clone()), what)?;
        let lark = format!("start: calls | answer\nanswer: %json {schema}\n{calls}");
        self.compile(
            TopLevelGrammar::from_lark(lark),
            "tool-call or JSON grammar",
        )
    }

    /// The Lark rules of tool calls, from the rule `calls` down: one rule
    /// per function, each a fixed text around a `%json` sub-grammar for the
    /// arguments.
    fn tool_call_lark(
        &self,
        format: ToolCallFormat,
        functions: &[&FunctionDefinition],
        repeat: bool,
    ) -> Result<String, PromptError> {
        let args_key = match format {
            ToolCallFormat::Llama3 => "parameters",
            ToolCallFormat::Hermes | ToolCallFormat::Mistral => "arguments",
        };
        let mut rules = String::new();
        let mut alternatives = Vec::new();
        for (i, function) in functions.iter().enumerate() {
            let what = format!("parameters of tool {:?}", function.name);
            let parameters = function
                .parameters
                .clone()
                .unwrap_or_else(|| json!({"type": "object"}));
            let schema = prepare_schema(&parameters, function.strict == Some(true), &what)?;
            // Compiled alone first, so that a bad schema is reported under
            // its tool's name rather than as a line of the whole grammar.
            self.compile(TopLevelGrammar::from_json_schema(schema.clone()), &what)?;
            let head = format!(
                "{{\"name\": {}, \"{args_key}\": ",
                Json::String(function.name.clone())
            );
            let (open, close) = match format {
                ToolCallFormat::Hermes => (
                    format!(
                        "{} {}",
                        self.marker("<tool_call>"),
                        lark_literal(&format!("\n{head}"))
                    ),
                    format!("{} {}", lark_literal("}\n"), self.marker("</tool_call>")),
                ),
                ToolCallFormat::Llama3 | ToolCallFormat::Mistral => {
                    (lark_literal(&head), lark_literal("}"))
                }
            };
            rules.push_str(&format!("call_{i}: {open} args_{i} {close}\n"));
            rules.push_str(&format!("args_{i}: %json {schema}\n"));
            alternatives.push(format!("call_{i}"));
        }
        let separator = match format {
            ToolCallFormat::Hermes => "\n",
            ToolCallFormat::Llama3 => "; ",
            ToolCallFormat::Mistral => ", ",
        };
        let calls = if repeat {
            format!("call ({} call)*", lark_literal(separator))
        } else {
            "call".to_owned()
        };
        let start = match format {
            ToolCallFormat::Mistral => format!(
                "calls: {} {} {calls} {}\n",
                self.marker("[TOOL_CALLS]"),
                lark_literal("["),
                lark_literal("]")
            ),
            ToolCallFormat::Hermes | ToolCallFormat::Llama3 => format!("calls: {calls}\n"),
        };
        Ok(format!(
            "{start}call: {}\n{rules}",
            alternatives.join(" | ")
        ))
    }

    /// A marker as a Lark atom: the special token when the tokenizer has
    /// one for it (`<[id]>`; grammars cannot spell special tokens from
    /// text), else the literal text.
    fn marker(&self, text: &str) -> String {
        match self.special_ids.get(text) {
            Some(id) => format!("<[{id}]>"),
            None => lark_literal(text),
        }
    }

    fn compile(&self, grammar: TopLevelGrammar, what: &str) -> Result<Grammar, PromptError> {
        let parser =
            self.factory
                .create_parser(grammar)
                .map_err(|e| PromptError::InvalidGrammar {
                    what: what.to_owned(),
                    source: e.into(),
                })?;
        Ok(Grammar {
            matcher: Matcher::new(Ok(parser)),
            words: self.words,
            n_vocab: self.n_vocab,
        })
    }
}

/// A Lark string literal: llguidance reads them as JSON strings.
fn lark_literal(text: &str) -> String {
    Json::String(text.to_owned()).to_string()
}

/// A schema ready for llguidance: an object (`true` means any value), made
/// strict if asked, with the JSON layout this crate generates.
fn prepare_schema(schema: &Json, strict: bool, what: &str) -> Result<Json, PromptError> {
    let mut schema = match schema {
        Json::Bool(true) => json!({}),
        Json::Object(_) => schema.clone(),
        _ => {
            return Err(PromptError::InvalidGrammar {
                what: what.to_owned(),
                source: "a JSON schema must be an object".into(),
            })
        }
    };
    if strict {
        close_objects(&mut schema);
    }
    let options = JsonCompileOptions {
        item_separator: ", ".to_owned(),
        key_separator: ": ".to_owned(),
        whitespace_flexible: false,
        ..JsonCompileOptions::default()
    };
    let options = serde_json::to_value(&options).map_err(|e| PromptError::InvalidGrammar {
        what: what.to_owned(),
        source: e.into(),
    })?;
    if let Json::Object(map) = &mut schema {
        map.insert("x-guidance".to_owned(), options);
    }
    Ok(schema)
}

/// Adds `"additionalProperties": false` to every object schema in `schema`
/// that does not set it, recursing into every place a subschema can be.
pub(crate) fn close_objects(schema: &mut Json) {
    let Json::Object(map) = schema else { return };
    let is_object = map.contains_key("properties")
        || match map.get("type") {
            Some(Json::String(t)) => t == "object",
            Some(Json::Array(types)) => types.iter().any(|t| t == "object"),
            _ => false,
        };
    if is_object && !map.contains_key("additionalProperties") {
        map.insert("additionalProperties".to_owned(), Json::Bool(false));
    }
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            // Maps from names to subschemas.
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                if let Json::Object(subschemas) = value {
                    subschemas.values_mut().for_each(close_objects);
                }
            }
            // One subschema, or a list of them.
            "items"
            | "prefixItems"
            | "additionalItems"
            | "additionalProperties"
            | "unevaluatedProperties"
            | "unevaluatedItems"
            | "contains"
            | "propertyNames"
            | "not"
            | "if"
            | "then"
            | "else"
            | "anyOf"
            | "oneOf"
            | "allOf" => match value {
                Json::Array(list) => list.iter_mut().for_each(close_objects),
                other => close_objects(other),
            },
            _ => {}
        }
    }
}

/// One request's grammar state: a [`TokenConstraint`] over llguidance's
/// `Matcher`.
pub struct Grammar {
    matcher: Matcher,
    words: usize,
    n_vocab: usize,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("n_vocab", &self.n_vocab)
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Grammar {
    /// The grammar as the constraint a request carries.
    pub fn into_shared(self) -> SharedConstraint {
        SharedConstraint::new(self)
    }
}

fn constraint_error(e: impl std::fmt::Display) -> ConstraintError {
    ConstraintError(e.to_string())
}

impl TokenConstraint for Grammar {
    fn fill_mask(&mut self, mask: &mut [u32]) -> Result<(), ConstraintError> {
        if mask.len() != self.words {
            return Err(ConstraintError(format!(
                "the mask has {} words but the grammar covers {} tokens ({} words)",
                mask.len(),
                self.n_vocab,
                self.words
            )));
        }
        // Once the grammar is complete, llguidance allows only the
        // end-of-sequence tokens (a plain `compute_mask` would fail there).
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(constraint_error)?;
        let source = allowed.as_slice();
        let n = self.words.min(source.len());
        mask[..n].copy_from_slice(&source[..n]);
        let tail_bits = self.n_vocab % 32;
        if tail_bits != 0 {
            if let Some(last) = mask.last_mut() {
                *last &= (1u32 << tail_bits) - 1;
            }
        }
        Ok(())
    }

    fn consume(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.matcher.consume_token(token).map_err(constraint_error)
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// The vocabulary as byte strings, as llguidance matches them.
struct TokenBytes {
    /// Bytes of each id; special tokens start with llguidance's marker
    /// byte 0xFF, so no text can produce them; unknown ids are empty.
    bytes: Vec<Vec<u8>>,
    special_ids: HashMap<String, TokenId>,
}

impl TokenBytes {
    /// Reads the bytes of every token from a byte-level BPE (GPT-2 style)
    /// or a byte-fallback (SentencePiece style) tokenizer, the same way
    /// llguidance's `toktrie_hf_tokenizers` does, but over this
    /// workspace's `tokenizers` version and without panicking on odd
    /// entries.
    fn of(tokenizer: &tokenizers::Tokenizer) -> Result<Self, PromptError> {
        let decoder = tokenizer
            .get_decoder()
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| PromptError::Vocabulary(format!("reading the decoder: {e}")))?
            .unwrap_or(Json::Null);
        let kind = DecoderKind::of(&decoder).ok_or_else(|| {
            PromptError::Vocabulary(format!(
                "only byte-level and byte-fallback tokenizers are supported, not decoder {}",
                decoder.get("type").unwrap_or(&Json::Null)
            ))
        })?;
        let added = tokenizer.get_added_tokens_decoder();
        let size = (tokenizer.get_vocab_size(true))
            .max(added.keys().map(|&id| id as usize + 1).max().unwrap_or(0));
        let mut bytes = vec![Vec::new(); size];
        let mut special_ids = HashMap::new();
        let char_map = byte_level_chars();
        for (id, slot) in bytes.iter_mut().enumerate() {
            let id = id as TokenId;
            if let Some(token) = added.get(&id) {
                // Like llguidance, treat `<...>` added tokens as special
                // even when the tokenizer does not: they are markup.
                if token.special || (token.content.starts_with('<') && token.content.ends_with('>'))
                {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(token.content.as_bytes());
                    *slot = marked;
                    special_ids.insert(token.content.clone(), id);
                } else {
                    *slot = token.content.as_bytes().to_vec();
                }
                continue;
            }
            let Some(name) = tokenizer.id_to_token(id) else {
                continue;
            };
            *slot = match kind {
                DecoderKind::ByteLevel => name
                    .chars()
                    .map(|c| char_map.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_default(),
                DecoderKind::ByteFallback { space } => {
                    match name
                        .strip_prefix("<0x")
                        .and_then(|hex| hex.strip_suffix('>'))
                    {
                        Some(hex) if hex.len() == 2 => u8::from_str_radix(hex, 16)
                            .map(|b| vec![b])
                            .unwrap_or_default(),
                        _ => name.replace(space, " ").into_bytes(),
                    }
                }
            };
        }
        Ok(Self { bytes, special_ids })
    }
}

/// How token strings map to bytes.
#[derive(Debug, Clone, Copy)]
enum DecoderKind {
    /// GPT-2's byte-to-unicode table.
    ByteLevel,
    /// `<0xHH>` tokens for raw bytes, `space` (usually `▁`) for spaces.
    ByteFallback { space: char },
}

impl DecoderKind {
    fn of(decoder: &Json) -> Option<Self> {
        let mut byte_level = false;
        let mut byte_fallback = false;
        let mut space = ' ';
        let mut stack = vec![decoder];
        while let Some(d) = stack.pop() {
            match d.get("type").and_then(Json::as_str) {
                Some("ByteLevel") => byte_level = true,
                Some("ByteFallback") => byte_fallback = true,
                Some("Replace") if d.get("content").and_then(Json::as_str) == Some(" ") => {
                    let pattern = d.pointer("/pattern/String").and_then(Json::as_str);
                    let mut chars = pattern.unwrap_or("").chars();
                    if let (Some(c), None) = (chars.next(), chars.next()) {
                        space = c;
                    }
                }
                Some("Sequence") => {
                    if let Some(list) = d.get("decoders").and_then(Json::as_array) {
                        stack.extend(list);
                    }
                }
                _ => {}
            }
        }
        if byte_fallback {
            Some(Self::ByteFallback { space })
        } else if byte_level {
            Some(Self::ByteLevel)
        } else {
            None
        }
    }
}

/// GPT-2's table from the printable characters byte-level BPE writes back
/// to the bytes they stand for.
fn byte_level_chars() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        if printable(b) {
            map.insert(char::from(b), b);
        } else if let Some(c) = char::from_u32(next) {
            map.insert(c, b);
            next += 1;
        }
    }
    map
}

/// llguidance's view of the tokenizer: the trie alone. Its `tokenize_bytes`
/// only serves forced ("fast-forward") tokens, which this crate never asks
/// for (the backend samples every token), so greedy trie tokenization is
/// enough and the tokenizer is declared non-canonical.
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_closes_every_object_schema_that_does_not_say_otherwise() {
        let mut schema = json!({
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                "open": {"type": "object", "additionalProperties": true},
                "list": {"type": "array", "items": {"properties": {"c": {}}}},
                "either": {"anyOf": [{"type": ["object", "null"]}, {"type": "string"}]}
            },
            "$defs": {"d": {"type": "object"}}
        });
        close_objects(&mut schema);
        assert_eq!(schema["additionalProperties"], json!(false));
        assert_eq!(
            schema["properties"]["a"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            schema["properties"]["open"]["additionalProperties"],
            json!(true)
        );
        assert_eq!(
            schema["properties"]["list"]["items"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            schema["properties"]["either"]["anyOf"][0]["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            schema["properties"]["either"]["anyOf"][1].get("additionalProperties"),
            None
        );
        assert_eq!(schema["$defs"]["d"]["additionalProperties"], json!(false));
        assert_eq!(
            schema["properties"]["a"]["properties"]["b"].get("additionalProperties"),
            None
        );
    }

    #[test]
    fn byte_level_table_covers_every_byte_once() {
        let map = byte_level_chars();
        assert_eq!(map.len(), 256);
        let mut bytes: Vec<u8> = map.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        // GPT-2 writes a space as `Ġ` and a newline as `Ċ`.
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'a'], b'a');
    }
}
