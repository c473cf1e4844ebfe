//! An incremental parser for `text/event-stream` bodies.
//!
//! Bytes arrive in chunks that split lines (and even UTF-8 characters)
//! anywhere, so the parser buffers until it has a whole line and hands back
//! the `data:` payload of each finished event.

/// Collects the `data:` payloads of server-sent events from arbitrary chunks.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// Feeds the next chunk of the body and returns every event it completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            self.line(line.trim_end_matches(['\n', '\r']), &mut events);
        }
        events
    }

    /// Ends the body: an event whose closing blank line never came is still
    /// returned, since some servers close the stream right after it.
    pub fn finish(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let rest = String::from_utf8_lossy(&rest);
            self.line(rest.trim_end_matches(['\n', '\r']), &mut events);
        }
        events.extend(self.data.take());
        events
    }

    fn line(&mut self, line: &str, events: &mut Vec<String>) {
        if line.is_empty() {
            events.extend(self.data.take());
        } else if let Some(value) = line.strip_prefix("data:") {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
        // Comments (`:`), `event:`, `id:` and `retry:` lines carry nothing
        // the benchmark needs.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_events_across_arbitrary_chunks() {
        let body = "data: {\"a\":1}\r\n\r\n: ping\n\ndata: x\ndata: y\n\ndata: [DONE]\n\n";
        for cut in 1..body.len() {
            let mut p = SseParser::default();
            let mut events = p.push(&body.as_bytes()[..cut]);
            events.extend(p.push(&body.as_bytes()[cut..]));
            events.extend(p.finish());
            assert_eq!(events, vec!["{\"a\":1}", "x\ny", "[DONE]"], "cut at {cut}");
        }
    }

    #[test]
    fn unterminated_last_event_is_kept() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: [DONE]").is_empty());
        assert_eq!(p.finish(), vec!["[DONE]"]);
    }
}
