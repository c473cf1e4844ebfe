//! Structured output: `response_format`, `tools`, `tool_choice` and
//! `parallel_tool_calls`, validated here into an [`OutputPlan`] and compiled
//! into the grammar the engine enforces token by token.
//!
//! The rule is that an output the client constrained cannot come back
//! unconstrained: a format is either compiled into a grammar or refused
//! with a 400 that names the parameter, never dropped. Which grammar:
//!
//! | `response_format` | `tool_choice`        | grammar                         |
//! |-------------------|----------------------|---------------------------------|
//! | text or absent    | none, auto or absent | none (calls parsed if offered)  |
//! | text or absent    | required             | one call, or several if parallel |
//! | text or absent    | a named function     | exactly one call of it          |
//! | JSON              | none or no tools     | the JSON format                 |
//! | JSON              | auto                 | tool calls, or the JSON answer  |
//! | JSON              | required or named    | refused: both fix the output    |
//!
//! Compiling a grammar costs 0.5 to 3 ms, so the routes call [`compile`]
//! off the async workers, with the template and the tokenizer.

use batching_types::SharedConstraint;
use prompt::{FunctionDefinition, PromptError, Tool, ToolChoice};
use serde_json::Value;

use crate::{openai::errors::ApiError, text_model::TextModel};

/// The longest function name OpenAI accepts.
const MAX_NAME: usize = 64;

/// What the output must be, from `response_format`.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Free text (`{"type": "text"}` or no `response_format`).
    Text,
    /// Any JSON object (`{"type": "json_object"}`).
    JsonObject,
    /// JSON that follows a schema (`{"type": "json_schema", "json_schema":
    /// {"name": ..., "schema": {...}, "strict": ...}}`).
    JsonSchema {
        /// The schema.
        schema: Value,
        /// OpenAI's strict mode: no keys beyond those listed.
        strict: bool,
    },
}

/// How the model may use the tools it is offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolMode {
    /// Tools are not shown and the output is not read for calls.
    None,
    /// The model decides; the output is read for calls.
    Auto,
    /// At least one call.
    Required,
    /// Exactly one call of this function.
    Named(String),
}

/// The tools of a request and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    /// The functions offered, validated.
    pub tools: Vec<Tool>,
    /// `tool_choice`.
    pub mode: ToolMode,
    /// `parallel_tool_calls` (default true): several calls in one answer.
    pub parallel: bool,
}

impl ToolPlan {
    /// No tools.
    pub fn none() -> Self {
        Self {
            tools: Vec::new(),
            mode: ToolMode::None,
            parallel: true,
        }
    }

    /// Whether the template shows the tools and the output is read for
    /// calls.
    pub fn active(&self) -> bool {
        !self.tools.is_empty() && self.mode != ToolMode::None
    }

    /// The tools the template shows.
    pub fn shown(&self) -> &[Tool] {
        if self.active() {
            &self.tools
        } else {
            &[]
        }
    }
}

/// Everything that shapes a response's output.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPlan {
    /// `response_format`.
    pub format: ResponseFormat,
    /// `tools` and how to use them.
    pub tools: ToolPlan,
}

impl OutputPlan {
    /// Validates the fields together (some combinations cannot be honoured).
    pub fn new(format: ResponseFormat, tools: ToolPlan) -> Result<Self, ApiError> {
        let forced = matches!(tools.mode, ToolMode::Required | ToolMode::Named(_));
        if format != ResponseFormat::Text && forced && !tools.tools.is_empty() {
            return Err(ApiError::invalid_param(
                "response_format",
                "response_format cannot be combined with a required or named tool_choice: both fix the whole output; use tool_choice \"auto\" to let the model either call a tool or answer in the format",
            ));
        }
        Ok(Self { format, tools })
    }
}

/// Reads `response_format`.
pub fn response_format(value: Option<&Value>) -> Result<ResponseFormat, ApiError> {
    const PARAM: &str = "response_format";
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(ResponseFormat::Text);
    };
    let kind = value.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid_param(
            "response_format.type",
            "response_format must be an object with a \"type\": \"text\", \"json_object\" or \"json_schema\"",
        )
    })?;
    match kind {
        "text" => Ok(ResponseFormat::Text),
        "json_object" => Ok(ResponseFormat::JsonObject),
        "json_schema" => {
            let spec = value
                .get("json_schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "response_format.json_schema",
                        "a json_schema response format needs a \"json_schema\" object with the \"schema\"",
                    )
                })?;
            if let Some(name) = spec.get("name") {
                check_name("response_format.json_schema.name", name)?;
            }
            let strict = match spec.get("strict") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid_param(
                        "response_format.json_schema.strict",
                        "strict must be a boolean",
                    ))
                }
            };
            match spec.get("schema") {
                // OpenAI lets the schema be left out: any JSON object.
                None | Some(Value::Null) => Ok(ResponseFormat::JsonObject),
                Some(schema @ (Value::Object(_) | Value::Bool(true))) => {
                    Ok(ResponseFormat::JsonSchema {
                        schema: schema.clone(),
                        strict,
                    })
                }
                Some(_) => Err(ApiError::invalid_param(
                    "response_format.json_schema.schema",
                    "the schema must be a JSON Schema object",
                )),
            }
        }
        other => Err(ApiError::invalid_param(
            PARAM,
            format!(
                "unknown response_format type {other:?}: expected \"text\", \"json_object\" or \"json_schema\""
            ),
        )),
    }
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`.
pub fn tools(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<ToolPlan, ApiError> {
    let tools = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, t)| tool(i, t))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "tools",
                "tools must be an array of {\"type\": \"function\", \"function\": {...}}",
            ))
        }
    };
    for (i, t) in tools.iter().enumerate() {
        if tools[..i]
            .iter()
            .any(|u| u.function.name == t.function.name)
        {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].function.name"),
                format!("the function name {:?} is used twice", t.function.name),
            ));
        }
    }
    let mode = tool_mode(choice, &tools)?;
    Ok(ToolPlan {
        tools,
        mode,
        parallel: parallel.unwrap_or(true),
    })
}

fn tool(i: usize, value: &Value) -> Result<Tool, ApiError> {
    let param = |field: &str| format!("tools[{i}]{field}");
    match value.get("type").and_then(Value::as_str) {
        Some("function") => {}
        _ => {
            return Err(ApiError::invalid_param(
                &param(".type"),
                "only tools of type \"function\" are supported",
            ))
        }
    }
    let function = value
        .get("function")
        .filter(|f| f.is_object())
        .ok_or_else(|| {
            ApiError::invalid_param(
                &param(".function"),
                "a function tool needs a \"function\" object",
            )
        })?;
    let name = function.get("name").ok_or_else(|| {
        ApiError::invalid_param(&param(".function.name"), "a function needs a name")
    })?;
    let name = check_name(&param(".function.name"), name)?;
    let description = match function.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(ApiError::invalid_param(
                &param(".function.description"),
                "the description must be a string",
            ))
        }
    };
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(_) => {
            return Err(ApiError::invalid_param(
                &param(".function.parameters"),
                "parameters must be a JSON Schema object",
            ))
        }
    };
    let strict = match function.get("strict") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(ApiError::invalid_param(
                &param(".function.strict"),
                "strict must be a boolean",
            ))
        }
    };
    Ok(Tool::function(FunctionDefinition {
        name,
        description,
        parameters,
        strict,
    }))
}

/// A function or schema name: 1 to 64 letters, digits, `_` or `-`, as
/// OpenAI requires (tool-call formats write it inside JSON and markup).
fn check_name(param: &str, name: &Value) -> Result<String, ApiError> {
    let ok = |n: &str| {
        (1..=MAX_NAME).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    match name.as_str() {
        Some(n) if ok(n) => Ok(n.to_owned()),
        _ => Err(ApiError::invalid_param(
            param,
            format!("{name} is not a valid name: use 1 to {MAX_NAME} letters, digits, underscores or dashes"),
        )),
    }
}

fn tool_mode(choice: Option<&Value>, tools: &[Tool]) -> Result<ToolMode, ApiError> {
    const PARAM: &str = "tool_choice";
    let mode = match choice {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                ToolMode::None
            } else {
                ToolMode::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolMode::None,
            "auto" => ToolMode::Auto,
            "required" => ToolMode::Required,
            other => {
                return Err(ApiError::invalid_param(
                    PARAM,
                    format!("unknown tool_choice {other:?}: expected \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
                ))
            }
        },
        Some(object @ Value::Object(_)) => {
            let name = object
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| object.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        PARAM,
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            ToolMode::Named(name.to_owned())
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                PARAM,
                "tool_choice must be a string or a function object",
            ))
        }
    };
    match &mode {
        ToolMode::Required if tools.is_empty() => Err(ApiError::invalid_param(
            PARAM,
            "tool_choice \"required\" needs tools",
        )),
        ToolMode::Named(name) if !tools.iter().any(|t| &t.function.name == name) => {
            Err(ApiError::invalid_param(
                PARAM,
                format!("the tool_choice names {name:?}, which is not among the tools"),
            ))
        }
        _ => Ok(mode),
    }
}

/// Compiles the grammar `plan` needs over `model`'s vocabulary, or `None`
/// when the output is free. Blocks for a few milliseconds.
pub fn compile(
    model: &dyn TextModel,
    plan: &OutputPlan,
) -> Result<Option<SharedConstraint>, ApiError> {
    let functions: Vec<FunctionDefinition> = plan
        .tools
        .shown()
        .iter()
        .map(|t| t.function.clone())
        .collect();
    let format = model.tool_call_format();
    let tool_choice = match &plan.tools.mode {
        _ if functions.is_empty() => None,
        ToolMode::Required if plan.tools.parallel => Some(ToolChoice::Required),
        ToolMode::Required => Some(ToolChoice::RequiredOne),
        ToolMode::Named(name) => Some(ToolChoice::Named(name.clone())),
        ToolMode::None | ToolMode::Auto => None,
    };
    let (param, json) = match &plan.format {
        ResponseFormat::Text => ("tool_choice", None),
        ResponseFormat::JsonObject => (
            "response_format",
            Some((serde_json::json!({"type": "object"}), false)),
        ),
        ResponseFormat::JsonSchema { schema, strict } => {
            ("response_format", Some((schema.clone(), *strict)))
        }
    };
    if tool_choice.is_none() && json.is_none() {
        return Ok(None);
    }
    let compiler = model.grammars().ok_or_else(|| {
        ApiError::invalid_param(
            param,
            "this model cannot constrain its output (its tokenizer has no end-of-sequence token, or is neither byte-level nor byte-fallback); the server log says which",
        )
    })?;
    let grammar = match (tool_choice, json) {
        (Some(choice), _) => compiler.tool_call(format, &functions, &choice),
        (None, Some((schema, strict)))
            if plan.tools.mode == ToolMode::Auto && !functions.is_empty() =>
        {
            compiler.tool_call_or_json(format, &functions, plan.tools.parallel, &schema, strict)
        }
        (None, Some((schema, strict))) => compiler.json_schema(&schema, strict),
        (None, None) => return Ok(None),
    };
    grammar.map(|g| Some(g.into_shared())).map_err(|e| match e {
        PromptError::InvalidGrammar { ref what, .. } if what.starts_with("parameters of tool") => {
            ApiError::invalid_param("tools", e.to_string())
        }
        PromptError::InvalidGrammar { .. } => ApiError::invalid_param(param, e.to_string()),
        PromptError::ToolChoice(_) => ApiError::invalid_param("tool_choice", e.to_string()),
        other => ApiError::internal(format!("compiling the output grammar: {other}")),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn param_of(e: &ApiError) -> Option<String> {
        e.param.clone()
    }

    #[test]
    fn response_formats_are_read_or_refused_by_name() {
        assert_eq!(response_format(None).unwrap(), ResponseFormat::Text);
        assert_eq!(
            response_format(Some(&json!({"type": "json_object"}))).unwrap(),
            ResponseFormat::JsonObject
        );
        assert_eq!(
            response_format(Some(&json!({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": true}}))).unwrap(),
            ResponseFormat::JsonSchema { schema: json!({"type": "object"}), strict: true }
        );
        for (bad, param) in [
            (json!({"type": "xml"}), "response_format"),
            (json!("json"), "response_format.type"),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": 3}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}),
                "response_format.json_schema.strict",
            ),
        ] {
            let e = response_format(Some(&bad)).unwrap_err();
            assert_eq!(param_of(&e).as_deref(), Some(param), "{bad}");
        }
    }

    #[test]
    fn tools_and_choices_are_checked_together() {
        let weather = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]);
        let plan = tools(Some(&weather), None, None).unwrap();
        assert_eq!(
            (plan.mode.clone(), plan.parallel, plan.active()),
            (ToolMode::Auto, true, true)
        );
        let plan = tools(Some(&weather), Some(&json!("none")), Some(false)).unwrap();
        assert!(!plan.active() && plan.shown().is_empty() && !plan.parallel);
        let named = json!({"type": "function", "function": {"name": "weather"}});
        assert_eq!(
            tools(Some(&weather), Some(&named), None).unwrap().mode,
            ToolMode::Named("weather".into())
        );
        assert_eq!(tools(None, None, None).unwrap(), ToolPlan::none());
        for (t, choice, param) in [
            (json!([{"type": "retrieval"}]), None, "tools[0].type"),
            (json!([{"type": "function"}]), None, "tools[0].function"),
            (
                json!([{"type": "function", "function": {"name": ""}}]),
                None,
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": []}}]),
                None,
                "tools[0].function.parameters",
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                None,
                "tools[1].function.name",
            ),
            (json!({"name": "f"}), None, "tools"),
            (weather.clone(), Some(json!("sometimes")), "tool_choice"),
            (
                weather.clone(),
                Some(json!({"type": "function", "function": {"name": "other"}})),
                "tool_choice",
            ),
            (json!([]), Some(json!("required")), "tool_choice"),
            (weather.clone(), Some(json!(3)), "tool_choice"),
        ] {
            let e = tools(Some(&t), choice.as_ref(), None).unwrap_err();
            assert_eq!(param_of(&e).as_deref(), Some(param), "{t} {choice:?}");
        }
        let forced = tools(Some(&weather), Some(&json!("required")), None).unwrap();
        let e = OutputPlan::new(ResponseFormat::JsonObject, forced.clone()).unwrap_err();
        assert_eq!(param_of(&e).as_deref(), Some("response_format"));
        assert!(OutputPlan::new(ResponseFormat::Text, forced).is_ok());
    }
}
