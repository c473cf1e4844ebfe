//! Tool calls in generated text: the formats models are trained on, parsed
//! from a finished output or incrementally from a stream of text deltas.
//!
//! One engine serves both: [`parse_tool_calls`] feeds the whole text to a
//! [`ToolCallParser`] at once. So a stream and the finished text always
//! agree, whatever the deltas were (a property test splits texts at random
//! points to check it).
//!
//! The content is the text outside successfully parsed calls, except that
//! whitespace touching a call is dropped (the newline between two
//! `<tool_call>` blocks is not content). Streaming therefore holds back a
//! trailing run of whitespace until something else follows, and a suffix
//! that could be the beginning of a tool-call marker; everything else is
//! emitted at once. A block whose JSON is malformed stays in the content,
//! as the model wrote it.

use rand::Rng;
use serde_json::Value as Json;

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ToolCallFormat {
    /// Hermes and Qwen2.5: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
    /// one block per call. Also this crate's convention for templates that
    /// show no tools.
    #[default]
    Hermes,
    /// Llama 3.1 and later: the whole answer is `{"name": ..., "parameters":
    /// {...}}` (or `"arguments"`), optionally after `<|python_tag|>`,
    /// several separated by `;`.
    Llama3,
    /// Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
    Mistral,
}

const HERMES_START: &str = "<tool_call>";
const HERMES_END: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_START: &str = "[TOOL_CALLS]";

impl ToolCallFormat {
    /// The format a chat template teaches, from its source: `[TOOL_CALLS]`
    /// is Mistral, `<|python_tag|>` or `ipython` is Llama 3, and anything
    /// else (including `<tool_call>`, or no tool support at all) is Hermes.
    pub fn detect(template_source: &str) -> Self {
        if template_source.contains(MISTRAL_START) {
            Self::Mistral
        } else if template_source.contains(PYTHON_TAG) || template_source.contains("ipython") {
            Self::Llama3
        } else {
            Self::Hermes
        }
    }
}

/// One tool call found in finished text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    /// A fresh id, `call_` and 24 random letters and digits.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// Its arguments: a JSON object, written compactly.
    pub arguments: String,
}

/// A finished output split into text and tool calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOutput {
    /// The text outside the calls; `None` when there are calls and no
    /// other text. Without calls it is the whole text, unchanged.
    pub content: Option<String>,
    /// The calls, in order.
    pub tool_calls: Vec<ParsedToolCall>,
}

/// Splits a finished output into content and tool calls.
pub fn parse_tool_calls(text: &str, format: ToolCallFormat) -> ParsedOutput {
    let mut parser = ToolCallParser::new(format);
    let mut events = parser.push(text);
    events.extend(parser.finish());
    let mut content = String::new();
    let mut tool_calls = Vec::new();
    for event in events {
        match event {
            ToolStreamEvent::Content(text) => content.push_str(&text),
            ToolStreamEvent::ToolCall(call) => tool_calls.push(ParsedToolCall {
                id: call.id,
                name: call.name,
                arguments: call.arguments,
            }),
        }
    }
    let content = (tool_calls.is_empty() || !content.is_empty()).then_some(content);
    ParsedOutput {
        content,
        tool_calls,
    }
}

/// One complete tool call found in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamedToolCall {
    /// Its position among the stream's calls, from 0.
    pub index: usize,
    /// A fresh id, `call_` and 24 random letters and digits.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// Its arguments: a JSON object, written compactly.
    pub arguments: String,
}

/// What a text delta turned out to contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolStreamEvent {
    /// Text for the client.
    Content(String),
    /// A tool call, complete.
    ToolCall(StreamedToolCall),
}

/// Where the parser is in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Hermes or Mistral: plain text, watching for the start marker.
    Text,
    /// Inside a Hermes `<tool_call>` block.
    HermesBlock,
    /// After `[TOOL_CALLS]`, before or inside its JSON array.
    MistralBlock,
    /// Llama 3, before the first character that decides between calls
    /// and plain text.
    LlamaStart,
    /// Llama 3, between or inside JSON calls.
    LlamaCalls,
    /// Plain text to the end: Llama 3 text that is not calls.
    Plain,
}

/// Splits a stream of text deltas into content and complete tool calls.
#[derive(Debug, Clone)]
pub struct ToolCallParser {
    format: ToolCallFormat,
    mode: Mode,
    /// Text received and not yet decided.
    buf: String,
    /// Where a JSON value being collected from `buf` has been scanned to.
    scan: JsonScanner,
    /// A trailing whitespace run of the content, held back: it is dropped
    /// if a call follows.
    pending_ws: String,
    /// The last thing decided was a call: whitespace after it is dropped.
    after_call: bool,
    /// Llama 3: what was skipped before the first call (whitespace and
    /// `<|python_tag|>`), given back as content if no call follows.
    llama_skipped: String,
    /// Calls emitted so far.
    calls: usize,
}

impl ToolCallParser {
    /// A parser for `format`.
    pub fn new(format: ToolCallFormat) -> Self {
        let mode = match format {
            ToolCallFormat::Hermes | ToolCallFormat::Mistral => Mode::Text,
            ToolCallFormat::Llama3 => Mode::LlamaStart,
        };
        Self {
            format,
            mode,
            buf: String::new(),
            scan: JsonScanner::default(),
            pending_ws: String::new(),
            after_call: false,
            llama_skipped: String::new(),
            calls: 0,
        }
    }

    /// Adds a text delta; returns the content and calls it completes.
    pub fn push(&mut self, delta: &str) -> Vec<ToolStreamEvent> {
        self.buf.push_str(delta);
        let mut events = Vec::new();
        while self.step(&mut events, false) {}
        events
    }

    /// Ends the stream: decides everything still held back. An unclosed
    /// Hermes block whose JSON is complete is a call (models sometimes stop
    /// before `</tool_call>`); any other unfinished block is content.
    pub fn finish(&mut self) -> Vec<ToolStreamEvent> {
        let mut events = Vec::new();
        while self.step(&mut events, true) {}
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.content(&mut events, &rest);
        }
        if !self.after_call && !self.pending_ws.is_empty() {
            events.push(ToolStreamEvent::Content(std::mem::take(
                &mut self.pending_ws,
            )));
        }
        self.pending_ws.clear();
        events
    }

    /// Decides what it can from `buf`; returns whether to go on.
    fn step(&mut self, events: &mut Vec<ToolStreamEvent>, at_end: bool) -> bool {
        match self.mode {
            Mode::Text => {
                let marker = match self.format {
                    ToolCallFormat::Mistral => MISTRAL_START,
                    _ => HERMES_START,
                };
                if let Some(at) = self.buf.find(marker) {
                    let before = self.buf[..at].to_owned();
                    self.content(events, &before);
                    self.buf.drain(..at + marker.len());
                    self.scan = JsonScanner::default();
                    self.mode = if self.format == ToolCallFormat::Mistral {
                        Mode::MistralBlock
                    } else {
                        Mode::HermesBlock
                    };
                    return true;
                }
                let keep = if at_end {
                    0
                } else {
                    marker_prefix_len(&self.buf, marker)
                };
                let split = self.buf.len() - keep;
                if split > 0 {
                    let text: String = self.buf.drain(..split).collect();
                    self.content(events, &text);
                }
                false
            }
            Mode::HermesBlock => {
                if let Some(end) = self.buf.find(HERMES_END) {
                    let body: String = self.buf.drain(..end).collect();
                    self.buf.drain(..HERMES_END.len());
                    match call_from_json_text(&body) {
                        Some((name, arguments)) => self.call(events, name, arguments),
                        None => self.content(events, &format!("{HERMES_START}{body}{HERMES_END}")),
                    }
                    self.mode = Mode::Text;
                    return true;
                }
                if at_end {
                    let body = std::mem::take(&mut self.buf);
                    match call_from_json_text(&body) {
                        Some((name, arguments)) => self.call(events, name, arguments),
                        None => self.content(events, &format!("{HERMES_START}{body}")),
                    }
                    self.mode = Mode::Text;
                }
                false
            }
            Mode::MistralBlock => {
                let Some(start) = self.buf.find(|c: char| !c.is_whitespace()) else {
                    if at_end {
                        let rest = std::mem::take(&mut self.buf);
                        self.content(events, &format!("{MISTRAL_START}{rest}"));
                        self.mode = Mode::Text;
                    }
                    return false;
                };
                if !self.buf[start..].starts_with('[') {
                    // Not the array this format promises: the marker was
                    // text after all.
                    self.content(events, MISTRAL_START);
                    self.mode = Mode::Text;
                    return true;
                }
                match self.scan.feed(&self.buf, start) {
                    Some(end) => {
                        let block: String = self.buf.drain(..end).collect();
                        match calls_from_json_array(&block[start..]) {
                            Some(calls) => {
                                for (name, arguments) in calls {
                                    self.call(events, name, arguments);
                                }
                            }
                            None => self.content(events, &format!("{MISTRAL_START}{block}")),
                        }
                        self.scan = JsonScanner::default();
                        self.mode = Mode::Text;
                        true
                    }
                    None => {
                        if at_end {
                            let rest = std::mem::take(&mut self.buf);
                            self.content(events, &format!("{MISTRAL_START}{rest}"));
                            self.mode = Mode::Text;
                        }
                        false
                    }
                }
            }
            Mode::LlamaStart => {
                let trimmed = self.buf.trim_start();
                let ws = self.buf.len() - trimmed.len();
                if trimmed.starts_with(PYTHON_TAG) {
                    self.llama_skipped = self.buf.drain(..ws + PYTHON_TAG.len()).collect();
                    self.mode = Mode::LlamaCalls;
                    return true;
                }
                if trimmed.starts_with('{') {
                    self.llama_skipped = self.buf.drain(..ws).collect();
                    self.scan = JsonScanner::default();
                    self.mode = Mode::LlamaCalls;
                    return true;
                }
                let undecided = trimmed.is_empty() || PYTHON_TAG.starts_with(trimmed);
                if undecided && !at_end {
                    return false;
                }
                self.mode = Mode::Plain;
                true
            }
            Mode::LlamaCalls => {
                // Separators between calls: whitespace and `;`.
                let skip = self
                    .buf
                    .find(|c: char| !c.is_whitespace() && c != ';')
                    .unwrap_or(self.buf.len());
                if skip == self.buf.len() {
                    if at_end {
                        self.llama_failed();
                    }
                    return false;
                }
                if !self.buf[skip..].starts_with('{') {
                    self.llama_failed();
                    return true;
                }
                match self.scan.feed(&self.buf, skip) {
                    Some(end) => {
                        let object = self.buf[skip..end].to_owned();
                        match call_from_json_text(&object) {
                            Some((name, arguments)) => {
                                self.buf.drain(..end);
                                self.scan = JsonScanner::default();
                                self.call(events, name, arguments);
                                true
                            }
                            None => {
                                self.llama_failed();
                                true
                            }
                        }
                    }
                    None => {
                        if at_end {
                            self.llama_failed();
                        }
                        false
                    }
                }
            }
            Mode::Plain => {
                if !self.buf.is_empty() {
                    let text = std::mem::take(&mut self.buf);
                    self.content(events, &text);
                }
                false
            }
        }
    }

    /// Llama 3 text that is not (or no longer) a call: the rest is plain
    /// text. Before the first call, what was skipped at the start is given
    /// back; after a call, the separators touching it are dropped.
    fn llama_failed(&mut self) {
        if self.calls == 0 {
            let skipped = std::mem::take(&mut self.llama_skipped);
            self.buf.insert_str(0, &skipped);
        } else {
            let skip = self
                .buf
                .find(|c: char| !c.is_whitespace() && c != ';')
                .unwrap_or(self.buf.len());
            self.buf.drain(..skip);
        }
        self.mode = Mode::Plain;
    }

    /// Emits `text` as content, holding back its trailing whitespace and
    /// dropping whitespace that touches the call before it.
    fn content(&mut self, events: &mut Vec<ToolStreamEvent>, text: &str) {
        if text.is_empty() {
            return;
        }
        let mut combined = std::mem::take(&mut self.pending_ws);
        combined.push_str(text);
        let body_end = combined.trim_end().len();
        if body_end == 0 {
            self.pending_ws = combined;
            return;
        }
        self.pending_ws = combined[body_end..].to_owned();
        combined.truncate(body_end);
        let body = if self.after_call {
            self.after_call = false;
            combined.trim_start()
        } else {
            combined.as_str()
        };
        match events.last_mut() {
            Some(ToolStreamEvent::Content(last)) => last.push_str(body),
            _ => events.push(ToolStreamEvent::Content(body.to_owned())),
        }
    }

    /// Emits a call; whitespace held back before it touches it and is
    /// dropped.
    fn call(&mut self, events: &mut Vec<ToolStreamEvent>, name: String, arguments: String) {
        self.pending_ws.clear();
        self.after_call = true;
        events.push(ToolStreamEvent::ToolCall(StreamedToolCall {
            index: self.calls,
            id: new_call_id(),
            name,
            arguments,
        }));
        self.calls += 1;
    }
}

/// A fresh call id: `call_` and 24 random letters and digits, as OpenAI's
/// look.
fn new_call_id() -> String {
    let suffix: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("call_{suffix}")
}

/// The length of the longest suffix of `text` that is a proper prefix of
/// `marker`: text that may still become the marker. Markers are ASCII, so
/// the split point is a char boundary.
fn marker_prefix_len(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.as_bytes().ends_with(&marker.as_bytes()[..k]))
        .unwrap_or(0)
}

/// A call from a JSON object text: `{"name": ..., "arguments": {...}}`
/// (or `"parameters"`, Llama's word). Arguments given as a string holding
/// an object are accepted too; missing arguments are `{}`.
fn call_from_json_text(text: &str) -> Option<(String, String)> {
    let value: Json = serde_json::from_str(text.trim()).ok()?;
    call_from_json(&value)
}

fn call_from_json(value: &Json) -> Option<(String, String)> {
    let object = value.as_object()?;
    let name = object.get("name")?.as_str()?;
    if name.is_empty() {
        return None;
    }
    let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
        None | Some(Json::Null) => "{}".to_owned(),
        Some(args @ Json::Object(_)) => args.to_string(),
        Some(Json::String(s)) => match serde_json::from_str::<Json>(s).ok()? {
            args @ Json::Object(_) => args.to_string(),
            _ => return None,
        },
        Some(_) => return None,
    };
    Some((name.to_owned(), arguments))
}

/// Calls from a Mistral JSON array; `None` unless every element is a call.
fn calls_from_json_array(text: &str) -> Option<Vec<(String, String)>> {
    let value: Json = serde_json::from_str(text).ok()?;
    let items = value.as_array()?;
    if items.is_empty() {
        return None;
    }
    items.iter().map(call_from_json).collect()
}

/// Finds where a JSON object or array ends in text that arrives in pieces,
/// remembering how far it has scanned.
#[derive(Debug, Clone, Default)]
struct JsonScanner {
    /// Bytes of the buffer already scanned.
    pos: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonScanner {
    /// Scans `text` from where it stopped (or from `start`, where the value
    /// begins with `{` or `[`); returns the end of the value once its last
    /// bracket closes.
    fn feed(&mut self, text: &str, start: usize) -> Option<usize> {
        let bytes = text.as_bytes();
        let mut i = self.pos.max(start);
        while i < bytes.len() {
            let b = bytes[i];
            i += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        self.pos = i;
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        self.pos = i;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn calls(out: &ParsedOutput) -> Vec<(&str, &str)> {
        out.tool_calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect()
    }

    #[test]
    fn detects_the_format_from_the_template() {
        assert_eq!(
            ToolCallFormat::detect("{{ '<tool_call>' }}"),
            ToolCallFormat::Hermes
        );
        assert_eq!(
            ToolCallFormat::detect("{{- '<|python_tag|>' }}"),
            ToolCallFormat::Llama3
        );
        assert_eq!(
            ToolCallFormat::detect("{%- if message.role == 'ipython' %}"),
            ToolCallFormat::Llama3
        );
        assert_eq!(
            ToolCallFormat::detect("{{ '[TOOL_CALLS]' }}"),
            ToolCallFormat::Mistral
        );
        assert_eq!(
            ToolCallFormat::detect("{{ message.content }}"),
            ToolCallFormat::Hermes
        );
    }

    #[test]
    fn hermes_blocks_become_calls_and_the_rest_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": \"{\\\"tz\\\": \\\"CET\\\"}\"}\n</tool_call>";
        let out = parse_tool_calls(text, ToolCallFormat::Hermes);
        assert_eq!(out.content.as_deref(), Some("Let me check."));
        assert_eq!(
            calls(&out),
            [
                ("get_weather", r#"{"city":"Paris","unit":"c"}"#),
                ("time", r#"{"tz":"CET"}"#)
            ]
        );

        let only = parse_tool_calls(
            "<tool_call>{\"name\": \"f\"}</tool_call>\n",
            ToolCallFormat::Hermes,
        );
        assert_eq!(only.content, None);
        assert_eq!(calls(&only), [("f", "{}")]);
    }

    #[test]
    fn text_without_calls_is_unchanged() {
        for format in [
            ToolCallFormat::Hermes,
            ToolCallFormat::Llama3,
            ToolCallFormat::Mistral,
        ] {
            for text in ["", "  Hello there.  \n", "a <tool_ x [TOOL_ {\"a\": 1}"] {
                let out = parse_tool_calls(text, format);
                assert_eq!(out.content.as_deref(), Some(text), "{format:?}");
                assert!(out.tool_calls.is_empty());
            }
        }
    }

    #[test]
    fn malformed_calls_stay_content() {
        let text = "A <tool_call>{\"name\": \"f\", \"arguments\": {oops}</tool_call> B";
        let out = parse_tool_calls(text, ToolCallFormat::Hermes);
        assert_eq!(out.content.as_deref(), Some(text));
        assert!(out.tool_calls.is_empty());

        let no_name = "<tool_call>{\"arguments\": {}}</tool_call>";
        assert_eq!(
            parse_tool_calls(no_name, ToolCallFormat::Hermes)
                .content
                .as_deref(),
            Some(no_name)
        );

        // A good block after a bad one still counts.
        let mixed = "<tool_call>[1]</tool_call>\n<tool_call>{\"name\": \"g\", \"arguments\": {}}</tool_call>";
        let out = parse_tool_calls(mixed, ToolCallFormat::Hermes);
        assert_eq!(out.content.as_deref(), Some("<tool_call>[1]</tool_call>"));
        assert_eq!(calls(&out), [("g", "{}")]);
    }

    #[test]
    fn an_unclosed_hermes_block_counts_only_if_its_json_is_complete() {
        let out = parse_tool_calls(
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n",
            ToolCallFormat::Hermes,
        );
        assert_eq!(calls(&out), [("f", r#"{"x":1}"#)]);
        let cut = "<tool_call>\n{\"name\": \"f\", \"argu";
        let out = parse_tool_calls(cut, ToolCallFormat::Hermes);
        assert_eq!(out.content.as_deref(), Some(cut));
        assert!(out.tool_calls.is_empty());
    }

    #[test]
    fn llama3_json_calls() {
        let out = parse_tool_calls(
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {\"q\": \"x;y\"}}; {\"name\": \"b\", \"arguments\": {}}",
            ToolCallFormat::Llama3,
        );
        assert_eq!(out.content, None);
        assert_eq!(calls(&out), [("a", r#"{"q":"x;y"}"#), ("b", "{}")]);

        let bare = parse_tool_calls(
            "\n{\"name\": \"a\", \"parameters\": {\"n\": [1, {\"m\": \"}\"}]}}",
            ToolCallFormat::Llama3,
        );
        assert_eq!(calls(&bare), [("a", r#"{"n":[1,{"m":"}"}]}"#)]);

        // JSON that is not a call, and prose mentioning one, are content.
        for text in [
            "{\"answer\": 42}",
            "Call {\"name\": \"a\", \"parameters\": {}}",
            "<|python_tag|>print(1)",
        ] {
            let out = parse_tool_calls(text, ToolCallFormat::Llama3);
            assert_eq!(out.content.as_deref(), Some(text));
            assert!(out.tool_calls.is_empty());
        }

        // Text after a call is content, without the separators.
        let out = parse_tool_calls(
            "{\"name\": \"a\", \"parameters\": {}}; done",
            ToolCallFormat::Llama3,
        );
        assert_eq!(out.content.as_deref(), Some("done"));
        assert_eq!(calls(&out), [("a", "{}")]);
    }

    #[test]
    fn mistral_tool_calls_array() {
        let out = parse_tool_calls(
            "Sure. [TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {\"k\": \"]\"}}, {\"name\": \"b\", \"arguments\": {}, \"id\": \"abc123def\"}]",
            ToolCallFormat::Mistral,
        );
        assert_eq!(out.content.as_deref(), Some("Sure."));
        assert_eq!(calls(&out), [("a", r#"{"k":"]"}"#), ("b", "{}")]);

        let bad = "[TOOL_CALLS][{\"name\": \"a\"}, 3]";
        let out = parse_tool_calls(bad, ToolCallFormat::Mistral);
        assert_eq!(out.content.as_deref(), Some(bad));
        let not_array = "[TOOL_CALLS] oops";
        assert_eq!(
            parse_tool_calls(not_array, ToolCallFormat::Mistral)
                .content
                .as_deref(),
            Some(not_array)
        );
    }

    #[test]
    fn streaming_emits_content_at_once_and_calls_when_complete() {
        let mut parser = ToolCallParser::new(ToolCallFormat::Hermes);
        assert_eq!(
            parser.push("Hello wor"),
            [ToolStreamEvent::Content("Hello wor".into())]
        );
        // A possible marker start and trailing whitespace are held back.
        assert_eq!(
            parser.push("ld <tool"),
            [ToolStreamEvent::Content("ld".into())]
        );
        assert!(parser.push("_call>{\"name\": \"f\", ").is_empty());
        let events = parser.push("\"arguments\": {}}</tool_call> and");
        let [ToolStreamEvent::ToolCall(call), ToolStreamEvent::Content(rest)] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!((call.index, call.name.as_str()), (0, "f"));
        assert!(
            call.id.starts_with("call_") && call.id.len() == 29,
            "{}",
            call.id
        );
        assert_eq!(rest, "and");
        assert_eq!(
            parser.push(" <tool_cal"),
            [] as [ToolStreamEvent; 0],
            "held back"
        );
        assert_eq!(
            parser.finish(),
            [ToolStreamEvent::Content(" <tool_cal".into())]
        );
    }

    #[test]
    fn stream_ids_are_distinct() {
        let mut parser = ToolCallParser::new(ToolCallFormat::Hermes);
        let events = parser.push(
            "<tool_call>{\"name\": \"f\"}</tool_call><tool_call>{\"name\": \"g\"}</tool_call>",
        );
        let ids: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                ToolStreamEvent::ToolCall(c) => Some(c.id.as_str()),
                ToolStreamEvent::Content(_) => None,
            })
            .collect();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1]);
    }

    /// Fragments that exercise every rule: markers (whole and cut), calls
    /// (valid, malformed, with tricky strings), separators, whitespace.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("<tool_call>".to_owned()),
            Just("</tool_call>".to_owned()),
            Just("<tool_".to_owned()),
            Just("[TOOL_CALLS]".to_owned()),
            Just("[TOOL_".to_owned()),
            Just("<|python_tag|>".to_owned()),
            Just("<|py".to_owned()),
            Just("{\"name\": \"f\", \"arguments\": {\"s\": \"a}]\\\"b\"}}".to_owned()),
            Just("{\"name\": \"g\", \"parameters\": {\"n\": [1, 2]}}".to_owned()),
            Just("[{\"name\": \"h\", \"arguments\": {}}]".to_owned()),
            Just("{\"oops\": ".to_owned()),
            Just("}".to_owned()),
            Just("; ".to_owned()),
            Just("\n".to_owned()),
            Just("  ".to_owned()),
            "[a-z é🙂]{1,6}",
        ]
    }

    fn summarize(events: Vec<ToolStreamEvent>) -> (String, Vec<(usize, String, String)>) {
        let mut content = String::new();
        let mut calls = Vec::new();
        for event in events {
            match event {
                ToolStreamEvent::Content(t) => content.push_str(&t),
                ToolStreamEvent::ToolCall(c) => calls.push((c.index, c.name, c.arguments)),
            }
        }
        (content, calls)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Splitting a text into arbitrary deltas gives the same content and
        /// calls as parsing it whole.
        #[test]
        fn deltas_parse_like_the_whole_text(
            parts in proptest::collection::vec(fragment(), 0..12),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
            format in prop_oneof![
                Just(ToolCallFormat::Hermes),
                Just(ToolCallFormat::Llama3),
                Just(ToolCallFormat::Mistral),
            ],
        ) {
            let text = parts.concat();
            let whole = parse_tool_calls(&text, format);

            let boundaries: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
            let mut points: Vec<usize> = cuts.iter().map(|c| boundaries[c.index(boundaries.len())]).collect();
            points.push(0);
            points.push(text.len());
            points.sort_unstable();
            points.dedup();
            let mut parser = ToolCallParser::new(format);
            let mut events = Vec::new();
            for pair in points.windows(2) {
                events.extend(parser.push(&text[pair[0]..pair[1]]));
            }
            events.extend(parser.finish());
            let (content, streamed) = summarize(events);

            let expected: Vec<(usize, String, String)> = whole
                .tool_calls
                .iter()
                .enumerate()
                .map(|(i, c)| (i, c.name.clone(), c.arguments.clone()))
                .collect();
            prop_assert_eq!(streamed, expected);
            prop_assert_eq!(Some(content.as_str()).filter(|c| !c.is_empty() || whole.tool_calls.is_empty()), whole.content.as_deref());
        }
    }
}
