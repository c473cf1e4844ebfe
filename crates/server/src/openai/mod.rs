//! OpenAI's wire format: request and response bodies, errors, and the JSON
//! extractor that turns bad bodies into OpenAI-shaped errors.

pub mod errors;
pub mod extract;
pub mod types;
