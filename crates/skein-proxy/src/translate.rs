//! Which translation a response needs, from what the client speaks and what the upstream that
//! served it speaks.

use bytes::Bytes;
use skein_providers::anthropic::{
    self, AnthropicPassthroughStream, AnthropicToOpenAiStream, OpenAiToAnthropicStream,
};
use skein_providers::gemini::{self, GeminiToOpenAiStream};
use skein_providers::openai::{self, PassthroughStream};
use skein_providers::{ChainedStream, StreamTranslator, Usage};

/// How to turn the upstream's answer into the client's.
#[derive(Debug, Clone)]
pub enum Translation {
    /// OpenAI client, OpenAI-shaped upstream.
    OpenAiPassthrough { client_wants_usage: bool },
    /// OpenAI client, Anthropic upstream.
    AnthropicToOpenAi { client_wants_usage: bool },
    /// OpenAI client, Gemini upstream.
    GeminiToOpenAi {
        client_wants_usage: bool,
        model: String,
    },
    /// OpenAI embeddings client, Gemini upstream.
    GeminiEmbeddingsToOpenAi { model: String, base64: bool },
    /// Anthropic client, Anthropic upstream.
    AnthropicPassthrough,
    /// Anthropic client, OpenAI-shaped upstream.
    OpenAiToAnthropic { requested_model: String },
    /// Anthropic client, Gemini upstream (through the OpenAI shape).
    GeminiToAnthropic {
        requested_model: String,
        model: String,
    },
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
            Translation::GeminiToOpenAi { model, .. } => {
                let (answer, usage) = gemini::response_to_openai(&body, model, unix_now())?;
                Ok((Bytes::from(answer.to_string()), usage))
            }
            Translation::GeminiEmbeddingsToOpenAi { model, base64 } => {
                let (answer, usage) = gemini::embeddings_response_to_openai(&body, model, *base64)?;
                Ok((Bytes::from(answer.to_string()), usage))
            }
            Translation::OpenAiToAnthropic { requested_model } => {
                let (answer, usage) = anthropic::response_from_openai(&body, requested_model)?;
                Ok((Bytes::from(answer.to_string()), usage))
            }
            Translation::GeminiToAnthropic {
                requested_model,
                model,
            } => {
                let (openai_answer, usage) = gemini::response_to_openai(&body, model, unix_now())?;
                let (answer, _) = anthropic::response_from_openai(
                    openai_answer.to_string().as_bytes(),
                    requested_model,
                )?;
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
            Translation::GeminiToOpenAi {
                client_wants_usage,
                model,
            } => Box::new(GeminiToOpenAiStream::new(
                *client_wants_usage,
                model,
                unix_now(),
            )),
            // Embeddings never stream; a passthrough keeps the type total.
            Translation::GeminiEmbeddingsToOpenAi { .. } => Box::new(PassthroughStream::new(false)),
            Translation::AnthropicPassthrough => Box::new(AnthropicPassthroughStream::new()),
            Translation::OpenAiToAnthropic { requested_model } => {
                Box::new(OpenAiToAnthropicStream::new(requested_model))
            }
            Translation::GeminiToAnthropic {
                requested_model,
                model,
            } => Box::new(ChainedStream::new(
                Box::new(GeminiToOpenAiStream::new(true, model, unix_now())),
                Box::new(OpenAiToAnthropicStream::new(requested_model)),
            )),
        }
    }
}
