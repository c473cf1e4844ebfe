//! Chat messages and tool definitions, shaped as OpenAI's API sends them.

use serde::{Deserialize, Serialize};

/// One message of a chat conversation, as OpenAI's API and Hugging Face
/// chat templates both spell it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool` or any role the template knows.
    pub role: String,
    /// The message text; absent for an assistant message that only calls
    /// tools.
    #[serde(default)]
    pub content: Option<String>,
    /// The tools an assistant message called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a `tool` message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For a `tool` message: the function's name (some templates print it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Some(content.into()),
            ..Self::default()
        }
    }

    /// An assistant message that calls `tool_calls`, with optional text.
    pub fn assistant_tool_calls(content: Option<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self {
            role: "assistant".to_owned(),
            content,
            tool_calls,
            ..Self::default()
        }
    }

    /// A `tool` message: the result of the call `tool_call_id`.
    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: "tool".to_owned(),
            content: Some(content.into()),
            tool_call_id: Some(tool_call_id.into()),
            ..Self::default()
        }
    }
}

/// One tool call of an assistant message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, which the `tool` message answering it repeats.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    /// The function called and its arguments.
    pub function: FunctionCall,
}

impl ToolCall {
    /// A function call with id `id`.
    pub fn function(
        id: impl Into<String>,
        name: impl Into<String>,
        arguments: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            kind: function_kind(),
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.into(),
            },
        }
    }
}

fn function_kind() -> String {
    "function".to_owned()
}

/// A function call: its name and its arguments as a JSON string (OpenAI
/// sends them as a string, not an object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// The arguments, a JSON object written as a string.
    #[serde(default)]
    pub arguments: String,
}

/// One entry of a request's `tools`: `{"type": "function", "function":
/// {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    /// The function the model may call.
    pub function: FunctionDefinition,
}

impl Tool {
    /// A function tool.
    pub fn function(function: FunctionDefinition) -> Self {
        Self {
            kind: function_kind(),
            function,
        }
    }
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDefinition {
    /// Its name.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of its arguments object; absent means no arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    /// Whether the arguments must follow `parameters` exactly (OpenAI's
    /// strict mode: no keys beyond those the schema lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

impl FunctionDefinition {
    /// A function `name` whose arguments follow `parameters`.
    pub fn new(name: impl Into<String>, parameters: serde_json::Value) -> Self {
        Self {
            name: name.into(),
            description: None,
            parameters: Some(parameters),
            strict: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shapes_round_trip() {
        let json = serde_json::json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}
            }]
        });
        let message: ChatMessage = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(message.content, None);
        assert_eq!(
            message.tool_calls,
            [ToolCall::function(
                "call_1",
                "get_weather",
                "{\"city\": \"Paris\"}"
            )]
        );
        assert_eq!(serde_json::to_value(&message).unwrap(), json);

        let tool: Tool = serde_json::from_value(serde_json::json!({
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object"}}
        }))
        .unwrap();
        assert_eq!(tool.function.name, "f");
        assert_eq!(tool.function.description, None);
    }
}
