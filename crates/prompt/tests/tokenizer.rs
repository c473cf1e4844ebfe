//! The tokenizer over real files: the default model's folder, and small
//! synthetic folders built here with the `tokenizers` crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{collections::HashMap, path::Path};

use prompt::{
    parse_tool_calls, ChatMessage, FunctionDefinition, PromptError, Tokenizer, Tool, ToolCall,
    ToolCallFormat,
};
use tokenizers::{
    models::wordlevel::WordLevel, pre_tokenizers::whitespace::Whitespace,
    processors::template::TemplateProcessing, AddedToken,
};

/// Writes a word-level tokenizer whose post-processor prepends `<s>` (as
/// Llama's and Mistral's do), with `tokenizer_config.json` naming `<s>` as
/// the BOS and `template` as the chat template.
fn write_bos_model(dir: &Path, template: &str) {
    let vocab: HashMap<String, u32> = [
        ("<unk>", 0),
        ("<s>", 1),
        ("</s>", 2),
        ("hello", 3),
        ("world", 4),
    ]
    .into_iter()
    .map(|(t, id)| (t.to_owned(), id))
    .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".to_owned())
        .build()
        .unwrap();
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    tokenizer.add_special_tokens(&[
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
    ]);
    tokenizer.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("<s> $A")
            .unwrap()
            .special_tokens(vec![("<s>", 1)])
            .build()
            .unwrap(),
    ));
    tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
    let config = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": {"content": "</s>"},
        "chat_template": template,
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

#[test]
fn a_bos_the_template_wrote_is_not_added_again() {
    let dir = tempfile::tempdir().unwrap();
    write_bos_model(
        dir.path(),
        "{{ bos_token }}{% for m in messages %}{{ m.content }} {% endfor %}",
    );
    let tok = Tokenizer::from_model_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_ids(), [2]);
    // Plain text still gets the post-processor's BOS.
    assert_eq!(tok.encode("hello world").unwrap(), [1, 3, 4]);
    let prompt = tok
        .apply_chat_template(&[ChatMessage::new("user", "hello world")], &[], true)
        .unwrap();
    assert_eq!(prompt, "<s>hello world ");
    assert_eq!(tok.encode(&prompt).unwrap(), [1, 3, 4], "exactly one BOS");
}

#[test]
fn a_broken_template_fails_at_load() {
    let dir = tempfile::tempdir().unwrap();
    write_bos_model(dir.path(), "{% if %}");
    let err = Tokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(matches!(err, PromptError::TemplateSyntax(_)), "{err:?}");
}

#[test]
fn a_chat_template_file_wins_over_the_config() {
    let dir = tempfile::tempdir().unwrap();
    write_bos_model(dir.path(), "from the config");
    std::fs::write(dir.path().join("chat_template.jinja"), "from the file").unwrap();
    let tok = Tokenizer::from_model_dir(dir.path()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&[], &[], false).unwrap(),
        "from the file"
    );
    assert_eq!(tok.chat_template_source(), Some("from the file"));
}

#[test]
fn a_missing_tokenizer_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_model_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, PromptError::Io { path, .. } if path.ends_with("tokenizer.json")),
        "{err:?}"
    );
}

/// The default template (ChatML, no tool support) with tools: the Hermes
/// fallback, tool results under the `tool` role (the template accepts any
/// role), and a prompt that tokenizes with `<|im_start|>` as one token.
#[test]
fn the_default_model_shows_tools_through_the_hermes_convention() {
    let Some(dir) = support::default_model_dir() else {
        return;
    };
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    assert_eq!(tok.tool_call_format(), ToolCallFormat::Hermes);
    let tools = [Tool::function(FunctionDefinition::new(
        "get_weather",
        serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}}),
    ))];
    let messages = [
        ChatMessage::new("user", "Weather in Paris?"),
        ChatMessage::assistant_tool_calls(
            Some("Let me look.".into()),
            vec![ToolCall::function(
                "call_1",
                "get_weather",
                r#"{"city": "Paris"}"#,
            )],
        ),
        ChatMessage::tool_result("call_1", "18 degrees"),
    ];
    let prompt = tok.apply_chat_template(&messages, &tools, true).unwrap();
    assert!(
        prompt.starts_with("<|im_start|>system\n# Tools\n"),
        "{prompt}"
    );
    assert!(
        prompt.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n</tools>"),
        "{prompt}"
    );
    assert!(
        prompt.contains("<|im_start|>assistant\nLet me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>"),
        "{prompt}"
    );
    assert!(
        prompt
            .contains("<|im_start|>tool\n<tool_response>\n18 degrees\n</tool_response><|im_end|>"),
        "{prompt}"
    );
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");

    // The assistant turn as rendered parses back into the call it came from.
    let turn = prompt
        .split("<|im_start|>assistant\n")
        .nth(1)
        .and_then(|t| t.split("<|im_end|>").next())
        .unwrap();
    let parsed = parse_tool_calls(turn, ToolCallFormat::Hermes);
    assert_eq!(parsed.content.as_deref(), Some("Let me look."));
    assert_eq!(parsed.tool_calls[0].name, "get_weather");
    assert_eq!(parsed.tool_calls[0].arguments, r#"{"city":"Paris"}"#);

    let ids = tok.encode(&prompt).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one token");
    assert_ne!(ids[1], 1, "and it is not doubled");
}

#[test]
fn special_tokens_can_be_kept_when_decoding() {
    let Some(dir) = support::default_model_dir() else {
        return;
    };
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>").unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "assistant\nHi");
    assert_eq!(
        tok.decode_keeping_special(&ids).unwrap(),
        "<|im_start|>assistant\nHi<|im_end|>"
    );
    let mut stream = tok.decode_stream_keeping_special();
    let mut text = String::new();
    for &id in &ids {
        text.push_str(&stream.push(id).unwrap().unwrap_or_default());
    }
    text.push_str(&stream.flush().unwrap().unwrap_or_default());
    assert_eq!(text, "<|im_start|>assistant\nHi<|im_end|>");
}

#[test]
fn the_model_side_types_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<prompt::GrammarCompiler>();
    fn assert_send<T: Send>() {}
    assert_send::<prompt::DecodeStream>();
    assert_send::<prompt::ToolCallParser>();
    assert_send::<prompt::Grammar>();
}
