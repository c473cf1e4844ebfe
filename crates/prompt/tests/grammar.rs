//! Constrained decoding over the default model's vocabulary: each grammar
//! is driven to completion by always taking some allowed token, and what
//! comes out must parse and follow its schema.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use batching_types::{mask_allows, TokenConstraint};
use prompt::{
    parse_tool_calls, FunctionDefinition, Grammar, GrammarCompiler, PromptError, Tokenizer,
    ToolCallFormat, ToolChoice,
};
use rand::{rngs::StdRng, seq::IndexedRandom, SeedableRng};
use serde_json::{json, Value};

/// The logits width used here: the vocabulary plus padding that is not a
/// multiple of 32, so padded ids share the mask's last word with real ones.
const PADDING: usize = 40;
const MAX_STEPS: usize = 400;

struct Setup {
    tokenizer: Tokenizer,
    compiler: GrammarCompiler,
    n_vocab: usize,
    /// Tokens made only of closing characters (`"`, `}`, `]`): preferring
    /// them after a while drives any JSON grammar to its end.
    closers: Vec<u32>,
}

fn setup() -> Option<Setup> {
    let dir = support::default_model_dir()?;
    let tokenizer = Tokenizer::from_model_dir(&dir).unwrap();
    let n_vocab = tokenizer.vocab_size() + PADDING;
    let started = Instant::now();
    let compiler =
        GrammarCompiler::from_tokenizer(&tokenizer, tokenizer.eos_token_ids(), n_vocab).unwrap();
    eprintln!("GrammarCompiler built in {:?}", started.elapsed());
    let closers = (0..tokenizer.vocab_size() as u32)
        .filter(|&t| {
            let text = tokenizer.decode(&[t]).unwrap();
            !text.is_empty() && text.chars().all(|c| matches!(c, '"' | '}' | ']'))
        })
        .collect();
    Some(Setup {
        tokenizer,
        compiler,
        n_vocab,
        closers,
    })
}

/// A finished run: the tokens taken and how long each mask took.
struct Run {
    tokens: Vec<u32>,
    mask_times: Vec<Duration>,
    /// How long compiling the grammar took (set by the caller).
    compile_time: Duration,
}

/// Compiles a grammar, timing it.
fn timed(compile: impl FnOnce() -> Grammar) -> (Grammar, Duration) {
    let started = Instant::now();
    let grammar = compile();
    (grammar, started.elapsed())
}

/// Drives `grammar` until it finishes: a seeded random allowed token for
/// the first `wander` steps (so strings and numbers get real content),
/// then an end-of-sequence or closing token whenever one is allowed.
/// Checks on the way that no padded id is ever allowed and that the
/// grammar reports itself finished only when nothing but EOS is left.
fn drive(s: &Setup, grammar: &mut Grammar, seed: u64, wander: usize) -> Run {
    let mut rng = StdRng::seed_from_u64(seed);
    let eos = s.tokenizer.eos_token_ids();
    let mut tokens = Vec::new();
    let mut mask_times = Vec::new();
    let mut mask = vec![0u32; s.n_vocab.div_ceil(32)];
    for step in 0..MAX_STEPS {
        mask.fill(0);
        let started = Instant::now();
        grammar.fill_mask(&mut mask).unwrap();
        mask_times.push(started.elapsed());
        let allowed: Vec<u32> = (0..s.n_vocab as u32)
            .filter(|&t| mask_allows(&mask, t))
            .collect();
        assert!(!allowed.is_empty(), "step {step}: nothing allowed");
        assert!(
            allowed.iter().all(|&t| (t as usize) < s.n_vocab - PADDING),
            "a padded id was allowed"
        );
        if grammar.is_finished() {
            assert!(
                allowed.iter().all(|t| eos.contains(t)),
                "a finished grammar allows only EOS"
            );
            return Run {
                tokens,
                mask_times,
                compile_time: Duration::ZERO,
            };
        }
        let token = if step < wander {
            let text_tokens: Vec<u32> = allowed
                .iter()
                .copied()
                .filter(|t| !eos.contains(t))
                .collect();
            *text_tokens.choose(&mut rng).unwrap_or(&allowed[0])
        } else if let Some(&t) = allowed.iter().find(|t| eos.contains(t)) {
            t
        } else {
            let closing: Vec<u32> = allowed
                .iter()
                .copied()
                .filter(|t| s.closers.binary_search(t).is_ok())
                .collect();
            *closing
                .choose(&mut rng)
                .unwrap_or_else(|| allowed.choose(&mut rng).unwrap())
        };
        grammar.consume(token).unwrap();
        if eos.contains(&token) {
            assert!(grammar.is_finished(), "EOS ends the grammar");
            return Run {
                tokens,
                mask_times,
                compile_time: Duration::ZERO,
            };
        }
        tokens.push(token);
    }
    panic!(
        "no end after {MAX_STEPS} steps: {:?}",
        s.tokenizer.decode(&tokens)
    );
}

/// The text a run wrote (shown with `--nocapture`).
fn text_of(s: &Setup, run: &Run) -> String {
    let text = s.tokenizer.decode(&run.tokens).unwrap();
    eprintln!("{text:?}");
    text
}

/// Prints (never asserts) the mask and compile times of `runs`.
fn report(name: &str, runs: &[Run]) {
    let times: Vec<Duration> = runs.iter().flat_map(|r| r.mask_times.clone()).collect();
    let total: Duration = times.iter().sum();
    let max = times.iter().max().copied().unwrap_or_default();
    let compile: Duration = runs.iter().map(|r| r.compile_time).sum();
    let compile_max = runs
        .iter()
        .map(|r| r.compile_time)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{name}: {} masks over {} runs, mean {:?}, max {:?}; compile mean {:?}, max {:?}",
        times.len(),
        runs.len(),
        total / times.len().max(1) as u32,
        max,
        compile / runs.len().max(1) as u32,
        compile_max
    );
}

fn assert_valid(schema: &Value, instance: &Value) {
    let validator = jsonschema::validator_for(schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{instance} does not follow {schema}: {errors:?}"
    );
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "kind": {"enum": ["cat", "dog"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "home": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"]
            }
        },
        "required": ["name", "age", "kind", "home"]
    })
}

#[test]
fn json_object_grammar_yields_json_objects() {
    let Some(s) = setup() else { return };
    let mut runs = Vec::new();
    for seed in 0..4 {
        let (mut grammar, compile_time) = timed(|| s.compiler.json_object().unwrap());
        let mut run = drive(&s, &mut grammar, seed, 24);
        run.compile_time = compile_time;
        let text = text_of(&s, &run);
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(value.is_object(), "{text}");
        runs.push(run);
    }
    report("json_object", &runs);
}

#[test]
fn json_schema_grammar_follows_the_schema() {
    let Some(s) = setup() else { return };
    let schema = person_schema();
    let mut runs = Vec::new();
    for seed in 0..4 {
        let (mut grammar, compile_time) = timed(|| s.compiler.json_schema(&schema, false).unwrap());
        let mut run = drive(&s, &mut grammar, seed, 40);
        run.compile_time = compile_time;
        let text = text_of(&s, &run);
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_valid(&schema, &value);
        runs.push(run);
    }
    report("json_schema", &runs);
}

/// Strict schemas get no keys beyond those listed, at any depth, even
/// when the driver wanders long enough to try.
#[test]
fn strict_json_schema_allows_no_extra_keys() {
    let Some(s) = setup() else { return };
    let schema = person_schema();
    let mut closed = schema.clone();
    closed["additionalProperties"] = json!(false);
    closed["properties"]["home"]["additionalProperties"] = json!(false);
    let mut runs = Vec::new();
    for seed in 0..4 {
        let (mut grammar, compile_time) = timed(|| s.compiler.json_schema(&schema, true).unwrap());
        let mut run = drive(&s, &mut grammar, seed, 80);
        run.compile_time = compile_time;
        let text = text_of(&s, &run);
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_valid(&closed, &value);
        for key in value.as_object().unwrap().keys() {
            assert!(
                schema["properties"].get(key).is_some(),
                "extra key {key} in {text}"
            );
        }
        runs.push(run);
    }
    report("json_schema strict", &runs);

    // Without strict, extra keys are allowed: with only optional
    // properties, the first key may be any string, so an unlisted one's
    // first character is allowed.
    let optional = json!({"type": "object", "properties": {"age": {"type": "integer"}}});
    let mut open = s.compiler.json_schema(&optional, false).unwrap();
    let mut closed_grammar = s.compiler.json_schema(&optional, true).unwrap();
    let brace_quote = s.tokenizer.encode("{\"").unwrap();
    let z = s.tokenizer.encode("z").unwrap();
    assert_eq!((brace_quote.len(), z.len()), (1, 1), "single tokens");
    let mut mask = vec![0u32; s.n_vocab.div_ceil(32)];
    for (grammar, allows) in [(&mut open, true), (&mut closed_grammar, false)] {
        grammar.consume(brace_quote[0]).unwrap();
        mask.fill(0);
        grammar.fill_mask(&mut mask).unwrap();
        assert_eq!(
            mask_allows(&mask, z[0]),
            allows,
            "strict must refuse key \"z...\""
        );
    }
}

fn tools() -> Vec<FunctionDefinition> {
    vec![
        FunctionDefinition::new(
            "get_weather",
            json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]}
                },
                "required": ["city", "unit"]
            }),
        ),
        FunctionDefinition::new(
            "add",
            json!({
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": false
            }),
        ),
    ]
}

/// Every format's tool-call grammar writes text that the parser of that
/// format reads back into calls of the offered functions, with arguments
/// that follow their schemas.
#[test]
fn tool_call_grammars_parse_back_into_valid_calls() {
    let Some(s) = setup() else { return };
    let functions = tools();
    let mut runs = Vec::new();
    for format in [
        ToolCallFormat::Hermes,
        ToolCallFormat::Llama3,
        ToolCallFormat::Mistral,
    ] {
        for (seed, choice) in [
            (1, ToolChoice::Required),
            (2, ToolChoice::Required),
            (3, ToolChoice::Named("add".into())),
            (4, ToolChoice::Named("get_weather".into())),
        ] {
            let (mut grammar, compile_time) =
                timed(|| s.compiler.tool_call(format, &functions, &choice).unwrap());
            let mut run = drive(&s, &mut grammar, seed, 30);
            run.compile_time = compile_time;
            let text = text_of(&s, &run);
            let parsed = parse_tool_calls(&text, format);
            assert_eq!(parsed.content, None, "{format:?}: {text:?}");
            assert!(!parsed.tool_calls.is_empty(), "{format:?}: {text:?}");
            for call in &parsed.tool_calls {
                if let ToolChoice::Named(name) = &choice {
                    assert_eq!(&call.name, name, "{text:?}");
                }
                let function = functions.iter().find(|f| f.name == call.name).unwrap();
                let arguments: Value = serde_json::from_str(&call.arguments).unwrap();
                assert_valid(function.parameters.as_ref().unwrap(), &arguments);
            }
            if format == ToolCallFormat::Hermes && seed == 3 {
                assert!(
                    text.starts_with("<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": "),
                    "{text:?}"
                );
                assert!(text.ends_with("}}\n</tool_call>"), "{text:?}");
            }
            runs.push(run);
        }
    }
    report("tool_call", &runs);
}

/// Tools left to the model with a response format: every run is either
/// tool calls that parse back or a JSON answer that follows the schema, and
/// both branches are reachable.
#[test]
fn tool_calls_or_a_json_answer() {
    let Some(s) = setup() else { return };
    let functions = tools();
    let schema = person_schema();
    let (mut calls, mut answers) = (0, 0);
    for seed in 0..12 {
        let mut grammar = s
            .compiler
            .tool_call_or_json(ToolCallFormat::Hermes, &functions, true, &schema, true)
            .unwrap();
        let run = drive(&s, &mut grammar, seed, 12);
        let text = text_of(&s, &run);
        let parsed = parse_tool_calls(&text, ToolCallFormat::Hermes);
        if parsed.tool_calls.is_empty() {
            let answer: Value = serde_json::from_str(&text).unwrap();
            assert_valid(&schema, &answer);
            answers += 1;
        } else {
            assert_eq!(parsed.content, None, "{text:?}");
            calls += 1;
        }
    }
    assert!(calls > 0 && answers > 0, "{calls} calls, {answers} answers");
}

#[test]
fn bad_schemas_and_choices_are_typed_errors() {
    let Some(s) = setup() else { return };
    let err = s
        .compiler
        .json_schema(
            &json!({"type": "object", "properties": {"a": {"type": "nonsense"}}}),
            false,
        )
        .unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err, PromptError::InvalidGrammar { .. }), "{err:?}");
    assert!(err.to_string().contains("nonsense"), "{err}");

    let err = s
        .compiler
        .json_schema(&json!({"$ref": "#/$defs/missing"}), false)
        .unwrap_err();
    eprintln!("{err}");
    assert!(err.to_string().contains("missing"), "{err}");

    let err = s.compiler.json_schema(&json!([1]), false).unwrap_err();
    assert!(err.to_string().contains("must be an object"), "{err}");

    let mut bad_tool = tools();
    bad_tool[0].parameters = Some(json!({"type": "object", "minProperties": "two"}));
    let err = s
        .compiler
        .tool_call(ToolCallFormat::Hermes, &bad_tool, &ToolChoice::Required)
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(&err, PromptError::InvalidGrammar { what, .. } if what.contains("get_weather")),
        "{err:?}"
    );

    let err = s
        .compiler
        .tool_call(
            ToolCallFormat::Hermes,
            &tools(),
            &ToolChoice::Named("nope".into()),
        )
        .unwrap_err();
    assert!(matches!(err, PromptError::ToolChoice(_)), "{err:?}");
    let err = s
        .compiler
        .tool_call(ToolCallFormat::Hermes, &[], &ToolChoice::Required)
        .unwrap_err();
    assert!(matches!(err, PromptError::ToolChoice(_)), "{err:?}");
}

#[test]
fn the_compiler_checks_its_inputs_and_masks() {
    let Some(dir) = support::default_model_dir() else {
        return;
    };
    let bytes = std::fs::read(dir.join("tokenizer.json")).unwrap();
    let err = GrammarCompiler::new(&bytes, &[2], 1000).unwrap_err();
    assert!(matches!(err, PromptError::Vocabulary(_)), "{err:?}");
    let err = GrammarCompiler::new(&bytes, &[], 49152).unwrap_err();
    assert!(matches!(err, PromptError::Vocabulary(_)), "{err:?}");
    let err = GrammarCompiler::new(&bytes, &[60_000], 49152).unwrap_err();
    assert!(matches!(err, PromptError::Vocabulary(_)), "{err:?}");

    let compiler = GrammarCompiler::new(&bytes, &[2], 49152).unwrap();
    let mut grammar = compiler.json_object().unwrap();
    let mut wrong = vec![0u32; 10];
    assert!(grammar.fill_mask(&mut wrong).is_err());
    // The first token of a JSON object is `{` or a token starting with it.
    let mut mask = vec![0u32; 49152 / 32];
    grammar.fill_mask(&mut mask).unwrap();
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let brace = tok.encode("{").unwrap()[0];
    let letter = tok.encode("a").unwrap()[0];
    assert!(mask_allows(&mask, brace));
    assert!(!mask_allows(&mask, letter));
    assert!(!mask_allows(&mask, 2), "EOS before anything is written");
    // A token the mask refused is an error, not a panic.
    assert!(grammar.consume(letter).is_err());

    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GrammarCompiler>();
}

/// Feeding a model's text token by token: after one complete call a named
/// choice is finished (only EOS is left), while a required choice may end
/// or go on with a parallel call, which parses back as a second call.
#[test]
fn required_allows_parallel_calls_and_named_stops_after_one() {
    let Some(s) = setup() else { return };
    let functions = tools();
    let one = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>";
    let two = format!(
        "{one}\n<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"Oslo\", \"unit\": \"celsius\"}}}}\n</tool_call>"
    );
    let eos = s.tokenizer.eos_token_ids()[0];
    let newline = s.tokenizer.encode("\n").unwrap()[0];
    let mut mask = vec![0u32; s.n_vocab.div_ceil(32)];

    let mut named = s
        .compiler
        .tool_call(
            ToolCallFormat::Hermes,
            &functions,
            &ToolChoice::Named("add".into()),
        )
        .unwrap();
    for t in s.tokenizer.encode(one).unwrap() {
        assert!(!named.is_finished());
        named.consume(t).unwrap();
    }
    assert!(named.is_finished(), "one call is all a named choice allows");
    named.fill_mask(&mut mask).unwrap();
    assert!(mask_allows(&mask, eos) && !mask_allows(&mask, newline));

    let mut required = s
        .compiler
        .tool_call(ToolCallFormat::Hermes, &functions, &ToolChoice::Required)
        .unwrap();
    for t in s.tokenizer.encode(one).unwrap() {
        required.consume(t).unwrap();
    }
    assert!(!required.is_finished());
    mask.fill(0);
    required.fill_mask(&mut mask).unwrap();
    assert!(mask_allows(&mask, eos) && mask_allows(&mask, newline));
    for t in s.tokenizer.encode(&two[one.len()..]).unwrap() {
        required.consume(t).unwrap();
    }
    required.consume(eos).unwrap();
    assert!(required.is_finished());
    let parsed = parse_tool_calls(&two, ToolCallFormat::Hermes);
    let names: Vec<&str> = parsed.tool_calls.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["add", "get_weather"]);
    assert_ne!(parsed.tool_calls[0].id, parsed.tool_calls[1].id);

    // `required` without parallel calls: any function, but one call only.
    let mut single = s
        .compiler
        .tool_call(ToolCallFormat::Hermes, &functions, &ToolChoice::RequiredOne)
        .unwrap();
    for t in s.tokenizer.encode(one).unwrap() {
        single.consume(t).unwrap();
    }
    assert!(single.is_finished(), "one call is all RequiredOne allows");
}

/// A vocabulary given as raw token bytes (a byte-level model with no
/// `tokenizer.json`) compiles grammars too, and its special tokens are
/// never produced from text.
#[test]
fn a_byte_vocabulary_compiles_grammars() {
    let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    words.push(Vec::new()); // 256: end of sequence.
    words.push(Vec::new()); // 257: a marker.
    let special = std::collections::HashMap::from([("<m>".to_owned(), 257)]);
    let compiler = GrammarCompiler::from_token_bytes(words, special, &[256], 300).unwrap();
    let mut grammar = compiler
        .json_schema(&json!({"type": "boolean"}), false)
        .unwrap();
    let mut mask = vec![0u32; 300usize.div_ceil(32)];
    grammar.fill_mask(&mut mask).unwrap();
    let allowed: Vec<u32> = (0..300).filter(|&t| mask_allows(&mask, t)).collect();
    assert_eq!(allowed, [u32::from(b'f'), u32::from(b't')]);
    for b in b"true" {
        grammar.consume(u32::from(*b)).unwrap();
    }
    mask.fill(0);
    grammar.fill_mask(&mut mask).unwrap();
    let allowed: Vec<u32> = (0..300).filter(|&t| mask_allows(&mask, t)).collect();
    assert_eq!(allowed, [256], "only the end is left");
    assert!(GrammarCompiler::from_token_bytes(
        vec![vec![b'a']],
        std::collections::HashMap::from([("<x>".to_owned(), 5)]),
        &[0],
        8
    )
    .is_err());
}
