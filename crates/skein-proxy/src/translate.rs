//! Which translation a response needs, from what the client speaks and what the upstream that
//! served it speaks.

use bytes::Bytes;
use skein_providers::anthropic::{
    self, AnthropicPassthroughStream, AnthropicToOpenAiStream, OpenAiToAnthropicStream,
};
use skein_providers::openai::{self, PassthroughStream};
use skein_providers::{StreamTranslator, Usage};

/// How to turn the upstream's answer into the client's.
#[derive(Debug, Clone)]
pub enum Translation {
    /// OpenAI client, OpenAI-shaped upstream.
    OpenAiPassthrough { client_wants_usage: bool },
    /// OpenAI client, Anthropic upstream.
    AnthropicToOpenAi { client_wants_usage: bool },
    /// Anthropic client, Anthropic upstream.
    AnthropicPassthrough,
    /// Anthropic client, OpenAI-shaped upstream.
    OpenAiToAnthropic { requested_model: String },
}

/// Seconds since the epoch, for OpenAI's `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

impl Translation {
    /// Translate a whole response body; also returns its usage.
    pub fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), String> {
        match self {
            Translation::OpenAiPassthrough { .. } => {
                let usage = openai::response_usage(&body);
                Ok((body, usage))
            }
            Translation::AnthropicPassthrough => {
                let usage = anthropic::response_usage(&body);
                Ok((body, usage))
            }
            Translation::AnthropicToOpenAi { .. } => {
                let (answer, usage) = anthropic::response_to_openai(&body, unix_now())?;
                Ok((Bytes::from(answer.to_string()), usage))
            }
            Translation::OpenAiToAnthropic { requested_model } => {
                let (answer, usage) = anthropic::response_from_openai(&body, requested_model)?;
                Ok((Bytes::from(answer.to_string()), usage))
            }
        }
    }

    /// The stream translator for this pair.
    pub fn stream(&self) -> Box<dyn StreamTranslator> {
        match self {
            Translation::OpenAiPassthrough { client_wants_usage } => {
                Box::new(PassthroughStream::new(*client_wants_usage))
            }
            Translation::AnthropicToOpenAi { client_wants_usage } => Box::new(
                AnthropicToOpenAiStream::new(*client_wants_usage, unix_now()),
            ),
            Translation::AnthropicPassthrough => Box::new(AnthropicPassthroughStream::new()),
            Translation::OpenAiToAnthropic { requested_model } => {
                Box::new(OpenAiToAnthropicStream::new(requested_model))
            }
        }
    }
}
