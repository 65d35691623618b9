//! Turning a growing list of generated tokens into text deltas: incremental detokenization that
//! never splits a UTF-8 character, and stop strings matched on the text.
//!
//! A byte-level BPE token can end in the middle of a character; decoding it alone gives U+FFFD.
//! [`IncrementalText`] decodes a window of recent tokens and releases new text only once it no
//! longer ends in U+FFFD (the method of Hugging Face's text-generation-inference).
//! [`StopFilter`] holds back any text that could still become a stop string, and cuts the text
//! where one appears; the stop string itself is never emitted.

/// Turns token ids into text.
pub trait Detokenizer: Send + Sync {
    /// The text of `ids` (special tokens skipped).
    fn decode(&self, ids: &[u32]) -> Result<String, String>;
}

/// Incremental decoding state of one sequence.
#[derive(Clone, Debug, Default)]
pub struct IncrementalText {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalText {
    /// Appends a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, detok: &dyn Detokenizer, token: u32) -> Result<String, String> {
        self.tokens.push(token);
        let prefix = detok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = detok.decode(&self.tokens[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(delta) = full
                .get(prefix.len()..)
                .filter(|_| full.starts_with(&prefix))
            {
                let delta = delta.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.tokens.len();
                return Ok(delta);
            }
        }
        Ok(String::new())
    }

    /// Whatever text is still pending at the end of the sequence (an incomplete character comes
    /// out as U+FFFD).
    pub fn finish(&mut self, detok: &dyn Detokenizer) -> Result<String, String> {
        if self.read_offset == self.tokens.len() {
            return Ok(String::new());
        }
        let prefix = detok.decode(&self.tokens[self.prefix_offset..self.read_offset])?;
        let full = detok.decode(&self.tokens[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        Ok(if full.starts_with(&prefix) {
            full[prefix.len()..].to_string()
        } else {
            String::new()
        })
    }
}

/// Stop-string matching over the generated text.
#[derive(Clone, Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    /// Text received but not yet released (it may be the start of a stop string).
    held: String,
}

/// What [`StopFilter::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Filtered {
    /// Release this text and go on.
    Text(String),
    /// A stop string appeared: release this text (everything before it) and stop.
    Stop(String),
}

impl StopFilter {
    /// A filter for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Takes new text; returns what may be released.
    pub fn push(&mut self, text: &str) -> Filtered {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return Filtered::Text(std::mem::take(&mut self.held));
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return Filtered::Stop(out);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        Filtered::Text(out)
    }

    /// Releases the held text at the end of the sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token i is byte `BYTES[i]`; decoding is lossy UTF-8 like a byte-level BPE decoder.
    struct Bytes;
    const BYTES: &[u8] = b"Hello, w\xc3\xa9\xe2\x82\xac!";
    impl Detokenizer for Bytes {
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            let b: Vec<u8> = ids.iter().map(|&i| BYTES[i as usize]).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        }
    }

    #[test]
    fn multibyte_characters_are_released_whole() {
        let mut t = IncrementalText::default();
        let deltas: Vec<String> = (0..BYTES.len() as u32)
            .map(|i| t.push(&Bytes, i).unwrap())
            .collect();
        assert_eq!(deltas.concat(), "Hello, wé€!");
        // 'é' is bytes 8..10: nothing after byte 8, then the whole character.
        assert_eq!(deltas[8], "");
        assert_eq!(deltas[9], "é");
        assert_eq!(
            (
                deltas[10].as_str(),
                deltas[11].as_str(),
                deltas[12].as_str()
            ),
            ("", "", "€")
        );
        assert_eq!(t.finish(&Bytes).unwrap(), "");
    }

    #[test]
    fn unfinished_character_comes_out_at_the_end() {
        let mut t = IncrementalText::default();
        assert_eq!(t.push(&Bytes, 0).unwrap(), "H");
        assert_eq!(t.push(&Bytes, 10).unwrap(), "");
        assert_eq!(t.finish(&Bytes).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn stop_strings_cut_the_text_and_are_not_emitted() {
        let mut f = StopFilter::new(&["END".to_string(), "\n\n".to_string()]);
        assert_eq!(f.push("Hello E"), Filtered::Text("Hello ".into()));
        assert_eq!(f.push("N"), Filtered::Text("".into()));
        // "ENx" can no longer become "END": released.
        assert_eq!(f.push("x wor"), Filtered::Text("ENx wor".into()));
        assert_eq!(f.push("ld\n"), Filtered::Text("ld".into()));
        assert_eq!(f.push("\nmore"), Filtered::Stop("".into()));
        let mut f = StopFilter::new(&["END".to_string()]);
        assert_eq!(f.push("abcENDdef"), Filtered::Stop("abc".into()));
        let mut f = StopFilter::new(&["END".to_string()]);
        assert_eq!(f.push("xE"), Filtered::Text("x".into()));
        assert_eq!(f.finish(), "E");
    }
}
