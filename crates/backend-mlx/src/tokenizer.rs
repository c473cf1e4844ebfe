//! Text to tokens and back, chat templates and streaming detokenization.
//!
//! The tokenizer is a thin layer over the `tokenizers` crate (which reads a
//! Hugging Face `tokenizer.json`) plus `minijinja` for the chat template in
//! `tokenizer_config.json`. It lives behind an `Arc`, so the server can clone
//! it into every request handler while the engine thread owns the model.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::BackendError;

/// One message of a chat conversation, as OpenAI's API and Hugging Face
/// chat templates both spell it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or any role the template knows.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's tokenizer and chat template. Cloning is cheap (an `Arc`).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tokenizer: tokenizers::Tokenizer,
    /// The chat template source, if the model ships one.
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_ids: Vec<u32>,
    /// The model folder, for error messages.
    dir: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.inner.dir)
            .field("vocab_size", &self.vocab_size())
            .field("eos_token_ids", &self.inner.eos_token_ids)
            .finish_non_exhaustive()
    }
}

/// The parts of `tokenizer_config.json` that matter here.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<ChatTemplateField>,
    #[serde(default)]
    bos_token: Option<TokenField>,
    #[serde(default)]
    eos_token: Option<TokenField>,
}

/// `chat_template` is either one template or a list of named ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ChatTemplateField {
    Single(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// Special tokens are written either as a string or as an `AddedToken`
/// object with a `content` field.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenField {
    Plain(String),
    Object { content: String },
}

impl TokenField {
    fn into_content(self) -> String {
        match self {
            TokenField::Plain(s) | TokenField::Object { content: s } => s,
        }
    }
}

/// `eos_token_id` in `config.json` is either one id or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct EosOnly {
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, BackendError> {
    let text = std::fs::read_to_string(path).map_err(|source| BackendError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| BackendError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` when present, from
    /// a model folder. End-of-sequence ids are the union of `config.json`'s
    /// and `generation_config.json`'s `eos_token_id` and the tokenizer
    /// config's `eos_token`, because models disagree about where they put it.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self, BackendError> {
        let dir = dir.as_ref();
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(BackendError::Io {
                path: tokenizer_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| BackendError::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        // A separate `chat_template.jinja` file wins, as in transformers.
        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path).map_err(|source| BackendError::Io {
                    path: jinja_path.clone(),
                    source,
                })?,
            )
        } else {
            match config.chat_template {
                Some(ChatTemplateField::Single(t)) => Some(t),
                Some(ChatTemplateField::Named(list)) => {
                    let mut default = None;
                    let mut first = None;
                    for named in list {
                        if named.name == "default" {
                            default = Some(named.template);
                        } else if first.is_none() {
                            first = Some(named.template);
                        }
                    }
                    default.or(first)
                }
                None => None,
            }
        };
        let bos_token = config.bos_token.map(TokenField::into_content);
        let eos_token = config.eos_token.map(TokenField::into_content);

        let mut eos: BTreeSet<u32> = BTreeSet::new();
        for file in ["config.json", "generation_config.json"] {
            let path = dir.join(file);
            if path.is_file() {
                let ids: EosOnly = read_json(&path)?;
                eos.extend(ids.eos_token_id.map(TokenIds::into_vec).unwrap_or_default());
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
            eos.insert(id);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                tokenizer,
                chat_template,
                bos_token,
                eos_token,
                eos_token_ids: eos.into_iter().collect(),
                dir: dir.to_path_buf(),
            }),
        })
    }

    /// Tokenizes `text` as-is: special tokens written in the text (such as
    /// `<|im_start|>` from a chat template) are recognised, and the
    /// tokenizer's post-processor decides whether a BOS token is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, BackendError> {
        let encoding = self
            .inner
            .tokenizer
            .encode(text, true)
            .map_err(|e| BackendError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Turns ids back into text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, BackendError> {
        self.inner
            .tokenizer
            .decode(ids, true)
            .map_err(|e| BackendError::Tokenizer(e.to_string()))
    }

    /// A detokenizer that turns a stream of ids into text pieces.
    pub fn decode_stream(&self) -> DecodeStream {
        DecodeStream {
            tokenizer: self.clone(),
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// The ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.inner.eos_token_ids
    }

    /// The number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.tokenizer.get_vocab_size(true)
    }

    /// The id of a token string such as `<|im_end|>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.inner.chat_template.is_some()
    }

    /// Renders the chat template over `messages`. `add_generation_prompt`
    /// appends the header that makes the model answer as the assistant.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, BackendError> {
        let source = self.inner.chat_template.as_deref().ok_or_else(|| {
            BackendError::Template(format!(
                "the model in {} has no chat template",
                self.inner.dir.display()
            ))
        })?;
        render_chat_template(
            source,
            &TemplateContext {
                messages,
                add_generation_prompt,
                bos_token: self.inner.bos_token.as_deref().unwrap_or(""),
                eos_token: self.inner.eos_token.as_deref().unwrap_or(""),
            },
        )
    }
}

/// What a chat template sees; a config struct instead of many arguments.
pub(crate) struct TemplateContext<'a> {
    pub(crate) messages: &'a [ChatMessage],
    pub(crate) add_generation_prompt: bool,
    pub(crate) bos_token: &'a str,
    pub(crate) eos_token: &'a str,
}

/// Renders a Hugging Face chat template with the helpers that
/// `transformers` provides: `raise_exception`, `strftime_now`, `tojson` and
/// Python string methods (through minijinja-contrib's pycompat).
pub(crate) fn render_chat_template(
    source: &str,
    ctx: &TemplateContext<'_>,
) -> Result<String, BackendError> {
    let mut env = Environment::new();
    // HF templates rely on Jinja2's whitespace rules: trim_blocks and
    // lstrip_blocks are on in transformers' sandboxed environment.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, _> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| -> String {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        strftime_utc(&format, secs)
    });
    env.add_template("chat", source)
        .map_err(|e| BackendError::Template(format!("invalid chat template: {e}")))?;
    let template = env
        .get_template("chat")
        .map_err(|e| BackendError::Template(e.to_string()))?;
    template
        .render(minijinja::context! {
            messages => ctx.messages,
            add_generation_prompt => ctx.add_generation_prompt,
            bos_token => ctx.bos_token,
            eos_token => ctx.eos_token,
        })
        .map_err(|e| BackendError::Template(format!("chat template failed: {e}")))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// The civil date (year, month 1-12, day 1-31) of a day count since
/// 1970-01-01, by Howard Hinnant's algorithm; it avoids a date crate for the
/// one helper that templates use to print today's date.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A small `strftime` for UTC time: the specifiers chat templates use
/// (`%d %b %B %m %Y %y %H %M %S %A %a %j %%`); others are copied verbatim.
pub(crate) fn strftime_utc(format: &str, unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let month_name = MONTHS[(month - 1) as usize];
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = WEEKDAYS[((days + 3).rem_euclid(7)) as usize];
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&day.to_string()),
                Some('m') => out.push_str(&month.to_string()),
                Some(other) => {
                    out.push_str("%-");
                    out.push(other);
                }
                None => out.push_str("%-"),
            },
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", (secs_of_day / 60) % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 of a civil date; the inverse of
/// [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Turns a stream of token ids into text pieces without ever splitting a
/// UTF-8 character or a multi-token grapheme.
///
/// Byte-level BPE tokens can end in the middle of a character, and some
/// tokenizers (SentencePiece) only render spaces correctly with context, so
/// the stream re-decodes a short window of recent ids and emits only the
/// text that has become stable (the same approach as Hugging Face's
/// text-generation-inference).
pub struct DecodeStream {
    tokenizer: Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DecodeStream {
    /// Adds one token; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, BackendError> {
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            // `full` extends `prefix` except in rare normaliser cases; fall
            // back to the char boundary so slicing never panics.
            let start = if full.is_char_boundary(prefix.len()) && full.starts_with(&prefix) {
                prefix.len()
            } else {
                common_prefix_len(&prefix, &full)
            };
            let piece = full[start..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Text still held back at the end of a stream (for example an
    /// incomplete character), decoded as well as the tokenizer can.
    pub fn flush(&mut self) -> Result<Option<String>, BackendError> {
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() {
            let start = common_prefix_len(&prefix, &full);
            Ok(Some(full[start..].to_owned()))
        } else {
            Ok(None)
        }
    }
}

/// The byte length of the longest common prefix of `a` and `b` that ends
/// on a char boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-23 12:34:56 UTC, a Tuesday, the 205th day of a leap year.
        let t = 1_721_738_096;
        assert_eq!(strftime_utc("%d %b %Y", t), "23 Jul 2024");
        assert_eq!(
            strftime_utc("%A %B %-d, %y %H:%M:%S %j %%", t),
            "Tuesday July 23, 24 12:34:56 205 %"
        );
        assert_eq!(strftime_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime_utc("%Y-%m-%d", 951_782_400), "2000-02-29");
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-1000, -1, 0, 59, 365, 11_016, 19_927, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn chatml_template_renders_with_generation_prompt() {
        let source = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        let out = render_chat_template(
            source,
            &TemplateContext {
                messages: &messages,
                add_generation_prompt: true,
                bos_token: "",
                eos_token: "",
            },
        )
        .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn hf_helpers_work_in_templates() {
        let source = "{{ bos_token }}{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip() | tojson }}{{ eos_token }}";
        let ok = [ChatMessage::new("user", "  hi \"there\" ")];
        let ctx = TemplateContext {
            messages: &ok,
            add_generation_prompt: false,
            bos_token: "<s>",
            eos_token: "</s>",
        };
        assert_eq!(
            render_chat_template(source, &ctx).unwrap(),
            "<s>\"hi \\\"there\\\"\"</s>"
        );
        let bad = [ChatMessage::new("system", "x")];
        let err = render_chat_template(
            source,
            &TemplateContext {
                messages: &bad,
                ..ctx
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("first must be user"), "{err}");
    }

    #[test]
    fn a_broken_template_is_a_clear_error() {
        let err = render_chat_template(
            "{% for %}",
            &TemplateContext {
                messages: &[],
                add_generation_prompt: false,
                bos_token: "",
                eos_token: "",
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("invalid chat template"), "{err}");
    }

    #[test]
    fn common_prefix_respects_char_boundaries() {
        assert_eq!(common_prefix_len("abc", "abd"), 2);
        assert_eq!(common_prefix_len("aé", "aè"), 1);
        assert_eq!(common_prefix_len("ab", "abc"), 2);
    }
}
