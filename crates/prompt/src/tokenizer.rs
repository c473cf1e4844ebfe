//! A model folder's tokenizer and chat template.
//!
//! The tokenizer is a thin layer over the `tokenizers` crate (which reads a
//! Hugging Face `tokenizer.json`) plus the chat template of
//! `tokenizer_config.json` (or `chat_template.jinja`), compiled once. It
//! lives behind an `Arc`, so the server can clone it into every request
//! handler while the engine thread owns the model.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;

use crate::{
    decode::DecodeStream,
    message::{ChatMessage, Tool},
    template::{ChatTemplate, TemplateContext},
    tool_parse::ToolCallFormat,
    PromptError,
};

/// A model's tokenizer and chat template. Cloning is cheap (an `Arc`).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tokenizer: tokenizers::Tokenizer,
    /// The chat template, compiled at load.
    template: Option<ChatTemplate>,
    /// Its source, for telling which tool-call format the model was
    /// trained on.
    template_source: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_ids: Vec<u32>,
    /// The number of ids, counted once: `tokenizers` clones its whole
    /// vocabulary to count it.
    vocab_size: usize,
    /// The text of the token the post-processor puts before every
    /// encoding (a BOS such as `<s>` or `<|begin_of_text|>`), if it adds
    /// one.
    added_prefix: Option<String>,
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
/// object with a `content` field (and `null` when a model has none).
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
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
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

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, PromptError> {
    let text = std::fs::read_to_string(path).map_err(|source| PromptError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| PromptError::Config {
        path: path.to_path_buf(),
        source,
    })
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` when present, from
    /// a model folder, and compiles the chat template. End-of-sequence ids
    /// are the union of `config.json`'s and `generation_config.json`'s
    /// `eos_token_id` and the tokenizer config's `eos_token`, because models
    /// disagree about where they put it.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self, PromptError> {
        let dir = dir.as_ref();
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(PromptError::Io {
                path: tokenizer_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|source| {
            PromptError::LoadTokenizer {
                what: tokenizer_path.display().to_string(),
                source,
            }
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            TokenizerConfig::default()
        };
        // A separate `chat_template.jinja` file wins, as in transformers.
        let jinja_path = dir.join("chat_template.jinja");
        let template_source = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path).map_err(|source| PromptError::Io {
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
        let template = template_source.clone().map(ChatTemplate::new).transpose()?;
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
        let added_prefix = added_prefix(&tokenizer);
        let vocab_size = tokenizer.get_vocab_size(true);
        Ok(Self {
            inner: Arc::new(Inner {
                tokenizer,
                template,
                template_source,
                bos_token,
                eos_token,
                eos_token_ids: eos.into_iter().collect(),
                vocab_size,
                added_prefix,
                dir: dir.to_path_buf(),
            }),
        })
    }

    /// Tokenizes `text`: special tokens written in the text (such as
    /// `<|im_start|>` from a chat template) are recognised, and the
    /// tokenizer's post-processor adds its special tokens (a BOS) unless
    /// the text already starts with the token it would add. Chat templates
    /// of Llama 3 and Mistral write the BOS themselves, and a second one
    /// degrades the model's answers.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, PromptError> {
        let starts_with_prefix = self
            .inner
            .added_prefix
            .as_deref()
            .is_some_and(|prefix| text.starts_with(prefix));
        let encoding = self
            .inner
            .tokenizer
            .encode(text, !starts_with_prefix)
            .map_err(PromptError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Turns ids back into text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.decode_with(ids, true)
    }

    /// Turns ids back into text, keeping special tokens: tool-call markers
    /// such as Mistral's `[TOOL_CALLS]` or Llama's `<|python_tag|>` are
    /// special tokens, and the tool-call parser needs to see them.
    pub fn decode_keeping_special(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.decode_with(ids, false)
    }

    pub(crate) fn decode_with(
        &self,
        ids: &[u32],
        skip_special: bool,
    ) -> Result<String, PromptError> {
        self.inner
            .tokenizer
            .decode(ids, skip_special)
            .map_err(PromptError::Decode)
    }

    /// A detokenizer that turns a stream of ids into text pieces, dropping
    /// special tokens.
    pub fn decode_stream(&self) -> DecodeStream {
        DecodeStream::new(self.clone(), true)
    }

    /// A detokenizer that keeps special tokens (see
    /// [`Tokenizer::decode_keeping_special`]); end-of-sequence tokens pushed
    /// into it show up as text too.
    pub fn decode_stream_keeping_special(&self) -> DecodeStream {
        DecodeStream::new(self.clone(), false)
    }

    /// The ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.inner.eos_token_ids
    }

    /// The number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    /// The id of a token string such as `<|im_end|>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.inner.template.is_some()
    }

    /// The chat template's source, if the model ships one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.inner.template_source.as_deref()
    }

    /// The tool-call format the chat template teaches the model (Hermes
    /// when it shows none, matching the fallback that renders tools for
    /// such templates).
    pub fn tool_call_format(&self) -> ToolCallFormat {
        ToolCallFormat::detect(self.chat_template_source().unwrap_or(""))
    }

    /// The underlying `tokenizers` tokenizer (for building a
    /// [`GrammarCompiler`](crate::GrammarCompiler) over it).
    pub fn hf_tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.inner.tokenizer
    }

    /// Renders the chat template over `messages`, showing `tools` (OpenAI's
    /// tool list; empty for none) to the model. `add_generation_prompt`
    /// appends the header that makes the model answer as the assistant.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
        add_generation_prompt: bool,
    ) -> Result<String, PromptError> {
        let template = self
            .inner
            .template
            .as_ref()
            .ok_or_else(|| PromptError::NoChatTemplate {
                dir: self.inner.dir.clone(),
            })?;
        template.render(&TemplateContext {
            messages,
            tools,
            add_generation_prompt,
            bos_token: self.inner.bos_token.as_deref().unwrap_or(""),
            eos_token: self.inner.eos_token.as_deref().unwrap_or(""),
        })
    }
}

/// The text of the special token the post-processor puts first: `Some("<s>")`
/// for a post-processor that prepends a BOS, `None` for one that adds
/// nothing or only appends. Found by encoding a probe with and without
/// special tokens, since the post-processor's configuration comes in many
/// shapes.
fn added_prefix(tokenizer: &tokenizers::Tokenizer) -> Option<String> {
    let with = tokenizer.encode("x", true).ok()?;
    let without = tokenizer.encode("x", false).ok()?;
    let first = *with.get_ids().first()?;
    let prepended = with.get_ids().len() > without.get_ids().len()
        && without.get_ids().first() != Some(&first)
        && with.get_special_tokens_mask().first() == Some(&1);
    if prepended {
        tokenizer.id_to_token(first)
    } else {
        None
    }
}
