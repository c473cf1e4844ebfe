//! `tokenizer.json` and `tokenizer_config.json` from the GGUF vocabulary.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is built, with the
//! pre-tokenizers whose Hugging Face equivalent is known exactly; any other
//! tokenizer is an error rather than a file that tokenizes differently from
//! the model's training.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::meta::Meta;
use crate::ImportError;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The tokenizer files of the output folder.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerFiles {
    /// `tokenizer.json`.
    pub tokenizer: Value,
    /// `tokenizer_config.json`.
    pub config: Value,
    /// Number of tokens in the vocabulary.
    pub vocab_size: usize,
}

/// Builds the tokenizer files. `model_max_length` is the context length.
pub fn build(meta: &Meta<'_>, model_max_length: usize) -> Result<TokenizerFiles, ImportError> {
    let fail = |reason: String| ImportError::Tokenizer {
        path: meta.path.to_path_buf(),
        reason,
    };
    let model = meta.str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(fail(format!(
            "tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"
        )));
    }
    let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = pre_tokenizer(pre).ok_or_else(|| {
        fail(format!(
            "pre-tokenizer `{pre}` is not supported (known: smollm, gpt-2, default)"
        ))
    })?;
    let tokens =
        meta.opt_strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| ImportError::MissingMetadata {
                path: meta.path.to_path_buf(),
                key: "tokenizer.ggml.tokens".to_owned(),
            })?;
    let types = meta.opt_ints("tokenizer.ggml.token_type")?;
    if let Some(types) = &types {
        if types.len() != tokens.len() {
            return Err(fail(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
    }
    let merges =
        meta.opt_strings("tokenizer.ggml.merges")?
            .ok_or_else(|| ImportError::MissingMetadata {
                path: meta.path.to_path_buf(),
                key: "tokenizer.ggml.merges".to_owned(),
            })?;

    let mut vocab = Map::new();
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        if let Some(first) = seen.insert(tok, id) {
            return Err(fail(format!(
                "token {tok:?} appears at ids {first} and {id}"
            )));
        }
        vocab.insert((*tok).to_owned(), json!(id));
    }
    let merges = merges
        .iter()
        .map(|m| {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| fail(format!("merge {m:?} is not two tokens")))?;
            Ok(json!([a, b]))
        })
        .collect::<Result<Vec<_>, ImportError>>()?;

    let mut added = Vec::new();
    let mut added_decoder = Map::new();
    for (id, ty) in types.iter().flatten().enumerate() {
        let special = match *ty {
            TYPE_CONTROL | TYPE_UNKNOWN => true,
            TYPE_USER_DEFINED => false,
            _ => continue,
        };
        let entry = |with_id: bool| {
            let mut e = Map::new();
            if with_id {
                e.insert("id".into(), json!(id));
            }
            e.insert("content".into(), json!(tokens[id]));
            e.insert("single_word".into(), json!(false));
            e.insert("lstrip".into(), json!(false));
            e.insert("rstrip".into(), json!(false));
            e.insert("normalized".into(), json!(false));
            e.insert("special".into(), json!(special));
            Value::Object(e)
        };
        added.push(entry(true));
        added_decoder.insert(id.to_string(), entry(false));
    }

    let token_at = |key: &str| -> Result<Option<&str>, ImportError> {
        match meta.opt_usize(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id)
                .copied()
                .map(Some)
                .ok_or_else(|| fail(format!("`{key}` = {id} is outside the vocabulary"))),
        }
    };
    let bos = token_at("tokenizer.ggml.bos_token_id")?;
    let eos = token_at("tokenizer.ggml.eos_token_id")?;
    let unk = token_at("tokenizer.ggml.unknown_token_id")?;
    let pad = token_at("tokenizer.ggml.padding_token_id")?;
    let add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = meta
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);

    let post_processor = match (add_bos, bos, add_eos, eos) {
        (false, _, false, _) => byte_level(true, false),
        (true, None, ..) | (_, _, true, None) => {
            return Err(fail("adds a BOS or EOS token without naming it".to_owned()))
        }
        _ => template(
            add_bos
                .then_some(bos)
                .flatten()
                .zip(meta.opt_usize("tokenizer.ggml.bos_token_id")?),
            add_eos
                .then_some(eos)
                .flatten()
                .zip(meta.opt_usize("tokenizer.ggml.eos_token_id")?),
        ),
    };

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": byte_level(true, true),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });

    let mut config = Map::new();
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    config.insert("add_prefix_space".into(), json!(false));
    config.insert("added_tokens_decoder".into(), Value::Object(added_decoder));
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    config.insert("model_max_length".into(), json!(model_max_length));
    config.insert("tokenizer_class".into(), json!("GPT2Tokenizer"));
    for (key, tok) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ] {
        if let Some(tok) = tok {
            config.insert(key.into(), json!(tok));
        }
    }
    if let Some(template) = meta.opt_str("tokenizer.chat_template")? {
        config.insert("chat_template".into(), json!(template));
    }
    Ok(TokenizerFiles {
        tokenizer,
        config: Value::Object(config),
        vocab_size: tokens.len(),
    })
}

/// The Hugging Face pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    match pre {
        // llama.cpp's "smollm" splits every digit on its own, then applies
        // the GPT-2 regex; this is SmolLM2's own tokenizer.json.
        "smollm" => Some(json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(false, true),
            ],
        })),
        "gpt-2" | "default" => Some(byte_level(false, true)),
        _ => None,
    }
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": trim_offsets,
        "use_regex": true,
    })
}

/// A post-processor that adds BOS and/or EOS around each sequence.
fn template(bos: Option<(&str, usize)>, eos: Option<(&str, usize)>) -> Value {
    let special = |tok: &str| json!({"SpecialToken": {"id": tok, "type_id": 0}});
    let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
    let wrap = |ids: &[&str]| {
        let mut parts = Vec::new();
        for id in ids {
            parts.extend(bos.map(|(t, _)| special(t)));
            parts.push(seq(id));
            parts.extend(eos.map(|(t, _)| special(t)));
        }
        parts
    };
    let mut specials = Map::new();
    for (tok, id) in bos.into_iter().chain(eos) {
        specials.insert(tok.into(), json!({"id": tok, "ids": [id], "tokens": [tok]}));
    }
    json!({
        "type": "TemplateProcessing",
        "single": wrap(&["A"]),
        "pair": wrap(&["A", "B"]),
        "special_tokens": specials,
    })
}
