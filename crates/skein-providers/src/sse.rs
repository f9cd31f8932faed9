//! Stream translation as a pure state machine: upstream SSE events in, client SSE events out.

use std::borrow::Cow;

use crate::error::TranslateError;
use crate::usage::Usage;

/// One server-sent event to write to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutEvent {
    /// The `event:` line, if any (Anthropic names its events; OpenAI does not).
    pub event: Option<Cow<'static, str>>,
    /// The `data:` payload.
    pub data: String,
}

impl OutEvent {
    pub fn data(data: String) -> OutEvent {
        OutEvent { event: None, data }
    }

    /// A named event (`event: message_start`).
    pub fn named(event: impl Into<Cow<'static, str>>, data: String) -> OutEvent {
        OutEvent {
            event: Some(event.into()),
            data,
        }
    }

    /// The bytes [`write_to`](Self::write_to) writes for a one-line payload.
    pub fn wire_len(&self) -> usize {
        self.event.as_ref().map_or(0, |event| event.len() + 8) + self.data.len() + 8
    }

    /// Append the wire form (`event: …\ndata: …\n\n`) to `output`.
    pub fn write_to(&self, output: &mut Vec<u8>) {
        if let Some(event) = &self.event {
            output.extend_from_slice(b"event: ");
            output.extend_from_slice(event.as_bytes());
            output.push(b'\n');
        }
        // A payload may not contain raw newlines in one data line; JSON we emit never does,
        // but an upstream's text might. Looked for with SIMD: most payloads are one line.
        let data = self.data.as_bytes();
        if memchr::memchr(b'\n', data).is_none() {
            output.extend_from_slice(b"data: ");
            output.extend_from_slice(data);
            output.extend_from_slice(b"\n\n");
            return;
        }
        for line in self.data.split('\n') {
            output.extend_from_slice(b"data: ");
            output.extend_from_slice(line.as_bytes());
            output.push(b'\n');
        }
        output.push(b'\n');
    }
}

/// Translates one upstream stream into the client's stream format.
pub trait StreamTranslator: Send {
    /// Handle one upstream event; push what the client should see into `out`. An error is
    /// always the upstream's fault (an event that cannot be read).
    fn on_event(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<OutEvent>,
    ) -> Result<(), TranslateError>;
    /// [`on_event`](Self::on_event) with the data owned, for a translator that can forward it
    /// without copying.
    fn on_owned_event(
        &mut self,
        event: &str,
        data: String,
        out: &mut Vec<OutEvent>,
    ) -> Result<(), TranslateError> {
        self.on_event(event, &data, out)
    }
    /// The upstream stream ended cleanly; push closing events.
    fn finish(&mut self, out: &mut Vec<OutEvent>);
    /// Usage seen so far.
    fn usage(&self) -> Usage;
    /// Whether the upstream said the answer is complete (so an end of stream is clean).
    fn completed(&self) -> bool;
    /// The upstream's stream broke: push the client's own failure events and say `true`, or
    /// say `false` to let the caller write a plain error event.
    fn fail(&mut self, _code: &str, _message: &str, _out: &mut Vec<OutEvent>) -> bool {
        false
    }
    /// The whole answer, once the stream completed, for a translator that builds one (the
    /// Responses API's final response, which is stored), as its JSON; taken once.
    fn take_result(&mut self) -> Option<Box<serde_json::value::RawValue>> {
        None
    }
}

/// Two translators in a row: the first's output is the second's input (Gemini → OpenAI →
/// Anthropic, for instance).
pub struct ChainedStream {
    first: Box<dyn StreamTranslator>,
    second: Box<dyn StreamTranslator>,
    between: Vec<OutEvent>,
}

impl ChainedStream {
    pub fn new(
        first: Box<dyn StreamTranslator>,
        second: Box<dyn StreamTranslator>,
    ) -> ChainedStream {
        ChainedStream {
            first,
            second,
            between: Vec::new(),
        }
    }

    fn pass_on(&mut self, out: &mut Vec<OutEvent>) -> Result<(), TranslateError> {
        for event in self.between.drain(..) {
            self.second
                .on_owned_event(event.event.as_deref().unwrap_or(""), event.data, out)?;
        }
        Ok(())
    }
}

impl StreamTranslator for ChainedStream {
    fn on_event(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<OutEvent>,
    ) -> Result<(), TranslateError> {
        self.first.on_event(event, data, &mut self.between)?;
        self.pass_on(out)
    }

    fn finish(&mut self, out: &mut Vec<OutEvent>) {
        self.first.finish(&mut self.between);
        let _ = self.pass_on(out);
        self.second.finish(out);
    }

    fn usage(&self) -> Usage {
        // The first translator reads the upstream's own figures.
        let mut usage = self.first.usage();
        usage.merge_max(&self.second.usage());
        usage
    }

    fn completed(&self) -> bool {
        self.second.completed()
    }

    fn fail(&mut self, code: &str, message: &str, out: &mut Vec<OutEvent>) -> bool {
        self.second.fail(code, message, out)
    }

    fn take_result(&mut self) -> Option<Box<serde_json::value::RawValue>> {
        self.second.take_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_written_one_data_line_per_payload_line() {
        let mut out = Vec::new();
        let one = OutEvent::named("response.created", "{\"a\":1}".to_owned());
        one.write_to(&mut out);
        assert_eq!(out, b"event: response.created\ndata: {\"a\":1}\n\n");
        assert_eq!(one.wire_len(), out.len());
        out.clear();
        OutEvent::data("first\nsecond".to_owned()).write_to(&mut out);
        assert_eq!(out, b"data: first\ndata: second\n\n");
    }
}
