//! How an upstream's answer becomes the client's. A provider adapter ([`crate::adapters`])
//! gives the reader of its own wire format (into the client's API when it speaks it natively,
//! otherwise into OpenAI chat); the inbound API ([`crate::inbound`]) adds the writer from
//! OpenAI chat into the client's API. [`Then`] puts the two in a row.

use axum::http::{HeaderName, HeaderValue};
use bytes::Bytes;
use skein_providers::{ChainedStream, StreamTranslator, TranslateError, Usage};

/// Turns one upstream answer (whole, or as a stream of events) into what the client gets.
pub trait ResponseTranslation: Send + Sync {
    /// Translate a whole response body; also returns its usage.
    fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), TranslateError>;
    /// The stream translator for one streamed answer.
    fn stream(&self) -> Box<dyn StreamTranslator>;
    /// A header telling the client what the translation left out, if anything.
    fn note(&self) -> Option<(HeaderName, HeaderValue)> {
        None
    }
}

/// The JSON text of a translated body. `serde_json::to_vec`: the `Display` of a `Value` writes
/// through a formatter and costs several times more (callgrind: most of a translated answer's
/// instructions).
pub fn json_bytes(value: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// Seconds since the epoch, for OpenAI's `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Two translations in a row: `first` reads the upstream (and its usage), `second` writes the
/// client's shape from what `first` produced.
pub struct Then {
    pub first: Box<dyn ResponseTranslation>,
    pub second: Box<dyn ResponseTranslation>,
}

impl ResponseTranslation for Then {
    fn unary(&self, body: Bytes) -> Result<(Bytes, Usage), TranslateError> {
        let (between, mut usage) = self.first.unary(body)?;
        let (answer, written) = self.second.unary(between)?;
        usage.merge_max(&written);
        Ok((answer, usage))
    }

    fn stream(&self) -> Box<dyn StreamTranslator> {
        Box::new(ChainedStream::new(
            self.first.stream(),
            self.second.stream(),
        ))
    }

    fn note(&self) -> Option<(HeaderName, HeaderValue)> {
        self.second.note().or_else(|| self.first.note())
    }
}
