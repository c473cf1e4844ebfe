//! Log probabilities in the two shapes OpenAI's endpoints use.

use std::collections::BTreeMap;

use crate::{
    generation::TokenInfo,
    openai::types::{ChatLogprobs, ChatTokenLogprob, TextLogprobs, TopLogprob},
    text_model::TextModel,
};

/// Chat's shape: one entry per token, each with its alternatives.
pub fn chat(model: &dyn TextModel, tokens: &[TokenInfo]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|info| {
                let token = model.token_text(info.token);
                ChatTokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: info.logprobs.logprob,
                    top_logprobs: info
                        .logprobs
                        .top
                        .iter()
                        .map(|&(t, logprob)| {
                            let token = model.token_text(t);
                            TopLogprob {
                                bytes: token.as_bytes().to_vec(),
                                token,
                                logprob,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

/// The legacy completions shape: columns, with each token's character
/// offset counted from `offset` (the text already sent before these).
pub fn text(model: &dyn TextModel, tokens: &[TokenInfo], mut offset: usize) -> TextLogprobs {
    let mut out = TextLogprobs::default();
    for info in tokens {
        let token = model.token_text(info.token);
        out.text_offset.push(offset);
        offset += token.chars().count();
        out.token_logprobs.push(info.logprobs.logprob);
        out.top_logprobs.push(
            info.logprobs
                .top
                .iter()
                .map(|&(t, lp)| (model.token_text(t), lp))
                .collect::<BTreeMap<_, _>>(),
        );
        out.tokens.push(token);
    }
    out
}
