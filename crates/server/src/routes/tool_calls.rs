//! Tool calls in a chat answer: the generated text split into content and
//! calls, whole (`parse_tool_calls`) or as it streams (`ToolCallParser`),
//! both from `prompt`, so a streamed answer and a whole one agree.
//!
//! With `parallel_tool_calls: false` and tools left to the model, no
//! grammar can stop a second call from being written, so only the first
//! call is returned and the rest are logged and dropped.

use prompt::{parse_tool_calls, ToolCall, ToolCallFormat, ToolCallParser, ToolStreamEvent};

use crate::openai::types::{ChatDelta, ToolCallDelta};

/// How to read calls out of a response.
#[derive(Debug, Clone, Copy)]
pub struct ToolOutput {
    /// How the model writes calls.
    pub format: ToolCallFormat,
    /// Whether more than one call may be returned.
    pub parallel: bool,
}

/// A whole answer split into content and calls.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitAnswer {
    /// The text outside the calls; `None` when there is only calls.
    pub content: Option<String>,
    /// The calls.
    pub tool_calls: Vec<ToolCall>,
    /// `tool_calls` when the answer ended normally with calls, else the
    /// engine's reason.
    pub finish_reason: &'static str,
}

impl ToolOutput {
    /// Splits a whole answer.
    pub fn split(self, text: String, reason: &'static str) -> SplitAnswer {
        let parsed = parse_tool_calls(&text, self.format);
        if parsed.tool_calls.is_empty() {
            return SplitAnswer {
                content: Some(text),
                tool_calls: Vec::new(),
                finish_reason: reason,
            };
        }
        let mut calls = parsed.tool_calls;
        if !self.parallel && calls.len() > 1 {
            tracing::info!(
                dropped = calls.len() - 1,
                "parallel_tool_calls is false: only the first call is returned"
            );
            calls.truncate(1);
        }
        SplitAnswer {
            content: parsed.content,
            tool_calls: calls
                .into_iter()
                .map(|c| ToolCall::function(c.id, c.name, c.arguments))
                .collect(),
            finish_reason: finish_reason(true, reason),
        }
    }

    /// A reader for a streamed answer.
    pub fn stream(self) -> ToolStream {
        ToolStream {
            parser: ToolCallParser::new(self.format),
            parallel: self.parallel,
            calls: 0,
        }
    }
}

/// `tool_calls` replaces a normal end when calls were made; a cut-off
/// answer stays `length`.
fn finish_reason(has_calls: bool, reason: &'static str) -> &'static str {
    if has_calls && reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
}

/// Reads calls out of a streamed answer, delta by delta.
#[derive(Debug)]
pub struct ToolStream {
    parser: ToolCallParser,
    parallel: bool,
    calls: usize,
}

impl ToolStream {
    /// The deltas a piece of generated text completes (none while it may
    /// still be the start of a call).
    pub fn push(&mut self, text: &str) -> Vec<ChatDelta> {
        let events = self.parser.push(text);
        self.deltas(events)
    }

    /// The deltas still held back at the end, and the finish reason.
    pub fn finish(&mut self, reason: &'static str) -> (Vec<ChatDelta>, &'static str) {
        let events = self.parser.finish();
        let deltas = self.deltas(events);
        (deltas, finish_reason(self.calls > 0, reason))
    }

    fn deltas(&mut self, events: Vec<ToolStreamEvent>) -> Vec<ChatDelta> {
        let mut out: Vec<ChatDelta> = Vec::new();
        for event in events {
            match event {
                ToolStreamEvent::Content(text) => {
                    // Consecutive text goes out in one delta.
                    match out.last_mut() {
                        Some(ChatDelta {
                            content: Some(previous),
                            tool_calls: None,
                            ..
                        }) => previous.push_str(&text),
                        _ => out.push(ChatDelta {
                            content: Some(text),
                            ..ChatDelta::default()
                        }),
                    }
                }
                ToolStreamEvent::ToolCall(call) => {
                    if !self.parallel && self.calls > 0 {
                        tracing::info!(
                            name = call.name,
                            "parallel_tool_calls is false: a further call is dropped"
                        );
                        continue;
                    }
                    out.push(ChatDelta {
                        tool_calls: Some(vec![ToolCallDelta {
                            index: self.calls,
                            call: ToolCall::function(call.id, call.name, call.arguments),
                        }]),
                        ..ChatDelta::default()
                    });
                    self.calls += 1;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TWO_CALLS: &str = "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";

    fn hermes(parallel: bool) -> ToolOutput {
        ToolOutput {
            format: ToolCallFormat::Hermes,
            parallel,
        }
    }

    #[test]
    fn whole_answers_split_into_content_and_calls() {
        let split = hermes(true).split(TWO_CALLS.to_owned(), "stop");
        assert_eq!(split.content.as_deref(), Some("Let me check."));
        let names: Vec<&str> = split
            .tool_calls
            .iter()
            .map(|c| c.function.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(split.tool_calls[0].function.arguments, "{\"x\":1}");
        assert!(split.tool_calls[0].id.starts_with("call_"));
        assert_eq!(split.finish_reason, "tool_calls");

        let single = hermes(false).split(TWO_CALLS.to_owned(), "stop");
        assert_eq!(single.tool_calls.len(), 1);
        let cut = hermes(true).split(TWO_CALLS.to_owned(), "length");
        assert_eq!(cut.finish_reason, "length");
        let plain = hermes(true).split("no calls".to_owned(), "stop");
        assert_eq!(
            (
                plain.content.as_deref(),
                plain.tool_calls.len(),
                plain.finish_reason
            ),
            (Some("no calls"), 0, "stop")
        );
    }

    #[test]
    fn streams_agree_with_whole_answers_whatever_the_pieces() {
        for piece in [1, 3, 7, 50] {
            for parallel in [true, false] {
                let mut stream = hermes(parallel).stream();
                let chars: Vec<char> = TWO_CALLS.chars().collect();
                let mut deltas = Vec::new();
                for chunk in chars.chunks(piece) {
                    deltas.extend(stream.push(&chunk.iter().collect::<String>()));
                }
                let (rest, reason) = stream.finish("stop");
                deltas.extend(rest);
                let content: String = deltas.iter().filter_map(|d| d.content.clone()).collect();
                let calls: Vec<ToolCallDelta> = deltas
                    .into_iter()
                    .filter_map(|d| d.tool_calls)
                    .flatten()
                    .collect();
                let whole = hermes(parallel).split(TWO_CALLS.to_owned(), "stop");
                assert_eq!(Some(content), whole.content, "piece {piece}");
                assert_eq!(calls.len(), whole.tool_calls.len());
                for (i, (streamed, whole)) in calls.iter().zip(&whole.tool_calls).enumerate() {
                    assert_eq!(streamed.index, i);
                    assert_eq!(streamed.call.function, whole.function);
                }
                assert_eq!(reason, "tool_calls");
            }
        }
    }
}
