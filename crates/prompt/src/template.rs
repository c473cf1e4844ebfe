//! Hugging Face chat templates, compiled once per model.
//!
//! A template is parsed into a minijinja [`Environment`] when the model is
//! loaded; rendering a request only looks the compiled template up. The
//! environment provides what `transformers` gives templates:
//! `raise_exception`, `strftime_now`, a `tojson` that writes JSON as Python
//! does, Python string methods (minijinja-contrib's pycompat) and Jinja2's
//! whitespace rules.
//!
//! Tools reach the template as `tools` (a list of `{"type": "function",
//! "function": {...}}` objects) and assistant tool calls as
//! `message.tool_calls[i].function.{name, arguments}` with the arguments
//! parsed into an object, exactly as `transformers` passes them. A template
//! that never mentions `tools` cannot show them, so for it this module falls
//! back to the Hermes convention (also Qwen2.5's): a system block listing
//! the tools inside `<tools></tools>` and asking for `<tool_call>` blocks,
//! earlier calls written back as those blocks, and results wrapped in
//! `<tool_response></tool_response>`.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::{value::Kwargs, Environment, ErrorKind, Value};
use serde_json::{json, Map, Value as Json};

use crate::{
    message::{ChatMessage, Tool},
    pyjson::{self, DumpOptions},
    PromptError,
};

/// The name the one template is stored under.
const NAME: &str = "chat";

/// A compiled chat template.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    /// Whether the template reads `tools` at all; if not, tools are shown
    /// through the Hermes fallback.
    knows_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("knows_tools", &self.knows_tools)
            .finish_non_exhaustive()
    }
}

/// What a chat template sees; a struct instead of many arguments.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TemplateContext<'a> {
    pub(crate) messages: &'a [ChatMessage],
    pub(crate) tools: &'a [Tool],
    pub(crate) add_generation_prompt: bool,
    pub(crate) bos_token: &'a str,
    pub(crate) eos_token: &'a str,
}

impl ChatTemplate {
    /// Parses `source` once, with the helpers `transformers` provides.
    pub(crate) fn new(source: String) -> Result<Self, PromptError> {
        let knows_tools = source.contains("tools");
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
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source)
            .map_err(PromptError::TemplateSyntax)?;
        Ok(Self { env, knows_tools })
    }

    /// Renders the conversation, showing `ctx.tools` through the template
    /// or, when it ignores tools, through the Hermes fallback.
    pub(crate) fn render(&self, ctx: &TemplateContext<'_>) -> Result<String, PromptError> {
        if ctx.tools.is_empty() || self.knows_tools {
            let messages = ctx
                .messages
                .iter()
                .map(template_message)
                .collect::<Result<Vec<_>, _>>()?;
            // `tools` is none, not an empty list, when the request has none:
            // templates test `tools is not none` and would otherwise print an
            // empty tool section.
            let tools = (!ctx.tools.is_empty()).then_some(ctx.tools);
            return self.render_values(ctx, &messages, tools);
        }
        let messages = hermes_fallback(ctx.messages, ctx.tools, "tool")?;
        match self.render_values(ctx, &messages, None) {
            // Templates that only accept the classic roles raise an
            // exception for `tool`; Qwen2.5's convention sends results as
            // user turns, which such templates accept.
            Err(first) if ctx.messages.iter().any(|m| m.role == "tool") => {
                let retry = hermes_fallback(ctx.messages, ctx.tools, "user")?;
                self.render_values(ctx, &retry, None).map_err(|_| first)
            }
            other => other,
        }
    }

    fn render_values(
        &self,
        ctx: &TemplateContext<'_>,
        messages: &[Json],
        tools: Option<&[Tool]>,
    ) -> Result<String, PromptError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(PromptError::TemplateRender)?;
        template
            .render(minijinja::context! {
                messages => Value::from_serialize(messages),
                tools => Value::from_serialize(tools),
                add_generation_prompt => ctx.add_generation_prompt,
                bos_token => ctx.bos_token,
                eos_token => ctx.eos_token,
            })
            .map_err(PromptError::TemplateRender)
    }
}

/// Parses a tool call's `arguments` string into the object templates
/// expect; an absent or empty string is `{}`, as vLLM does.
fn parse_arguments(name: &str, arguments: &str) -> Result<Json, PromptError> {
    if arguments.trim().is_empty() {
        return Ok(Json::Object(Map::new()));
    }
    serde_json::from_str(arguments).map_err(|source| PromptError::ToolArguments {
        name: name.to_owned(),
        source,
    })
}

/// A message as `transformers` hands it to a template: OpenAI's fields,
/// with tool-call arguments parsed.
fn template_message(message: &ChatMessage) -> Result<Json, PromptError> {
    let mut out = Map::new();
    out.insert("role".into(), json!(message.role));
    out.insert("content".into(), json!(message.content));
    if !message.tool_calls.is_empty() {
        let calls = message
            .tool_calls
            .iter()
            .map(|call| {
                let arguments = parse_arguments(&call.function.name, &call.function.arguments)?;
                Ok(json!({
                    "id": call.id,
                    "type": call.kind,
                    "function": {"name": call.function.name, "arguments": arguments},
                }))
            })
            .collect::<Result<Vec<_>, PromptError>>()?;
        out.insert("tool_calls".into(), Json::Array(calls));
    }
    if let Some(id) = &message.tool_call_id {
        out.insert("tool_call_id".into(), json!(id));
    }
    if let Some(name) = &message.name {
        out.insert("name".into(), json!(name));
    }
    Ok(Json::Object(out))
}

/// The system text of the Hermes convention (Qwen2.5's wording), listing
/// `tools` one JSON object per line.
pub(crate) fn hermes_tools_prompt(tools: &[Tool]) -> String {
    let mut text = String::from(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
         You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    );
    for tool in tools {
        text.push('\n');
        // A Tool always serializes: it is strings and JSON values only.
        let value = serde_json::to_value(tool).unwrap_or(Json::Null);
        text.push_str(&pyjson::dumps(&value));
    }
    text.push_str(
        "\n</tools>\n\nFor each function call, return a json object with function name and \
         arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    text
}

/// One call as a Hermes `<tool_call>` block.
pub(crate) fn hermes_call_block(name: &str, arguments: &Json) -> String {
    format!(
        "<tool_call>\n{}\n</tool_call>",
        pyjson::dumps(&json!({"name": name, "arguments": arguments}))
    )
}

/// The conversation rewritten for a template that does not know tools:
/// the tool list joins the first system message (or becomes one),
/// assistant tool calls become `<tool_call>` blocks in the content, and
/// tool results are sent under `tool_role`, wrapped in `<tool_response>`.
fn hermes_fallback(
    messages: &[ChatMessage],
    tools: &[Tool],
    tool_role: &str,
) -> Result<Vec<Json>, PromptError> {
    let tools_prompt = hermes_tools_prompt(tools);
    let mut out = Vec::with_capacity(messages.len() + 1);
    match messages.first() {
        Some(first) if first.role == "system" => {}
        _ => out.push(json!({"role": "system", "content": tools_prompt})),
    }
    for (i, message) in messages.iter().enumerate() {
        let mut content = message.content.clone().unwrap_or_default();
        let mut role = message.role.as_str();
        if i == 0 && role == "system" {
            content = if content.is_empty() {
                tools_prompt.clone()
            } else {
                format!("{content}\n\n{tools_prompt}")
            };
        } else if role == "tool" {
            role = tool_role;
            content = format!("<tool_response>\n{content}\n</tool_response>");
        }
        for call in &message.tool_calls {
            let arguments = parse_arguments(&call.function.name, &call.function.arguments)?;
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&hermes_call_block(&call.function.name, &arguments));
        }
        out.push(json!({"role": role, "content": content}));
    }
    Ok(out)
}

/// `tojson` as `transformers` defines it: Python's `json.dumps` with
/// `ensure_ascii=False` and the `indent`, `separators`, `sort_keys` and
/// `ensure_ascii` arguments templates pass.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(indent) => Some(indent),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let mut options = match indent.filter(|v| !v.is_none() && !v.is_undefined()) {
        None => DumpOptions::default(),
        Some(v) => match v.as_str() {
            Some(s) => DumpOptions::indented(s.to_owned()),
            None => {
                let n = usize::try_from(v)?;
                DumpOptions::indented(" ".repeat(n))
            }
        },
    };
    if let Some(separators) = kwargs.get::<Option<Vec<String>>>("separators")? {
        let [item, key] = <[String; 2]>::try_from(separators).map_err(|_| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be (item_separator, key_separator)",
            )
        })?;
        options.item_separator = item;
        options.key_separator = key;
    }
    if let Some(sort_keys) = kwargs.get::<Option<bool>>("sort_keys")? {
        options.sort_keys = sort_keys;
    }
    if let Some(ensure_ascii) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        options.ensure_ascii = ensure_ascii;
    }
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: not serializable")
            .with_source(e)
    })?;
    Ok(Value::from(pyjson::dumps_with(&json, &options)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{FunctionDefinition, ToolCall};

    fn render(
        source: &str,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> Result<String, PromptError> {
        ChatTemplate::new(source.to_owned())?.render(&TemplateContext {
            messages,
            tools,
            add_generation_prompt: true,
            bos_token: "<s>",
            eos_token: "</s>",
        })
    }

    /// SmolLM2-135M-Instruct's template: ChatML that never mentions tools
    /// and concatenates `message['content']`, so it needs text content.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A tool-aware template in the style of Qwen2.5's: tools listed with
    /// `tojson`, calls printed from `function.name` and
    /// `function.arguments | tojson`.
    const TOOL_AWARE: &str = "{%- if tools %}{{ 'TOOLS:' }}{% for tool in tools %}{{ '\\n' + tool | tojson }}{% endfor %}{{ '\\n' }}{% endif %}{%- for message in messages %}{{ message.role + ': ' }}{% if message.content %}{{ message.content }}{% endif %}{% for call in message.tool_calls %}[{{ call.function.name }} {{ call.function.arguments | tojson }} {{ call.function.arguments.city }}]{% endfor %}{% if message.role == 'tool' %} ({{ message.tool_call_id }}){% endif %}{{ '\\n' }}{% endfor %}";

    fn weather_tool() -> Tool {
        Tool::function(FunctionDefinition {
            name: "get_weather".into(),
            description: Some("Weather <now>".into()),
            parameters: Some(serde_json::json!({
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"]
            })),
            strict: None,
        })
    }

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage::assistant_tool_calls(
                None,
                vec![ToolCall::function(
                    "call_1",
                    "get_weather",
                    r#"{"city":"Paris"}"#,
                )],
            ),
            ChatMessage::tool_result("call_1", "18°C"),
        ]
    }

    #[test]
    fn chatml_template_renders_with_generation_prompt() {
        let source = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        assert_eq!(
            render(source, &messages, &[]).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn hf_helpers_work_in_templates() {
        let source = "{{ bos_token }}{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip() | tojson }}{{ eos_token }}";
        assert_eq!(
            render(source, &[ChatMessage::new("user", "  hi \"there\" ")], &[]).unwrap(),
            "<s>\"hi \\\"there\\\"\"</s>"
        );
        let err = render(source, &[ChatMessage::new("system", "x")], &[]).unwrap_err();
        assert!(matches!(err, PromptError::TemplateRender(_)), "{err:?}");
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn a_broken_template_fails_when_compiled_not_when_used() {
        let err = ChatTemplate::new("{% for %}".to_owned()).unwrap_err();
        assert!(matches!(err, PromptError::TemplateSyntax(_)), "{err:?}");
        assert!(err.to_string().contains("invalid chat template"), "{err}");
    }

    #[test]
    fn tojson_writes_json_as_transformers_does() {
        let source = "{{ {'b': [1, 'é<x>'], 'a': none} | tojson }}|{{ [1, {'k': true}] | tojson(indent=2) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=(',', ':')) }}|{{ 'é' | tojson(ensure_ascii=true) }}";
        assert_eq!(
            render(source, &[], &[]).unwrap(),
            "{\"b\": [1, \"é<x>\"], \"a\": null}|[\n  1,\n  {\n    \"k\": true\n  }\n]|{\"a\":2,\"b\":1}|\"\\u00e9\""
        );
    }

    #[test]
    fn tool_aware_templates_get_tools_and_parsed_arguments() {
        let out = render(TOOL_AWARE, &conversation(), &[weather_tool()]).unwrap();
        assert_eq!(
            out,
            "TOOLS:\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather <now>\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n\
             user: Weather in Paris?\n\
             assistant: [get_weather {\"city\": \"Paris\"} Paris]\n\
             tool: 18°C (call_1)\n"
        );
        // Without tools the template sees `tools` as none: no tool section.
        let plain = render(TOOL_AWARE, &[ChatMessage::new("user", "Hi")], &[]).unwrap();
        assert_eq!(plain, "user: Hi\n");
    }

    #[test]
    fn templates_without_tools_get_the_hermes_convention() {
        let out = render(SMOLLM2, &conversation(), &[weather_tool()]).unwrap();
        let expected = format!(
            "<|im_start|>system\n{}<|im_end|>\n\
             <|im_start|>user\nWeather in Paris?<|im_end|>\n\
             <|im_start|>assistant\n<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"Paris\"}}}}\n</tool_call><|im_end|>\n\
             <|im_start|>tool\n<tool_response>\n18°C\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\n",
            hermes_tools_prompt(&[weather_tool()])
        );
        assert_eq!(out, expected);
        assert!(
            expected.contains(
                "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""
            ),
            "{expected}"
        );

        // A system message keeps its text, with the tools after it.
        let mut messages = conversation();
        messages.insert(0, ChatMessage::new("system", "Be brief."));
        let out = render(SMOLLM2, &messages, &[weather_tool()]).unwrap();
        assert!(
            out.starts_with("<|im_start|>system\nBe brief.\n\n# Tools\n"),
            "{out}"
        );
        assert_eq!(out.matches("<|im_start|>system").count(), 1, "{out}");
    }

    #[test]
    fn tool_results_become_user_turns_for_templates_that_refuse_the_role() {
        let strict = "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";
        let out = render(strict, &conversation(), &[weather_tool()]).unwrap();
        assert!(
            out.ends_with("[user] <tool_response>\n18°C\n</tool_response>\n"),
            "{out}"
        );
        // Without tools nothing is rewritten, and the refusal stands.
        let err = render(strict, &conversation(), &[]).unwrap_err();
        assert!(err.to_string().contains("unknown role tool"), "{err}");
    }

    #[test]
    fn tool_call_arguments_must_be_json() {
        let messages = [ChatMessage::assistant_tool_calls(
            None,
            vec![ToolCall::function("c", "f", "{not json")],
        )];
        let err = render(TOOL_AWARE, &messages, &[weather_tool()]).unwrap_err();
        assert!(
            matches!(&err, PromptError::ToolArguments { name, .. } if name == "f"),
            "{err:?}"
        );
        // Empty arguments are an empty object, as vLLM reads them.
        let messages = [ChatMessage::assistant_tool_calls(
            None,
            vec![ToolCall::function("c", "f", "")],
        )];
        let out = render(TOOL_AWARE, &messages, &[weather_tool()]).unwrap();
        assert!(out.contains("[f {} ]"), "{out}");
    }

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
}
