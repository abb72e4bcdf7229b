//! The no-serde fast path for OpenAI-dialect stream events: most events of
//! a stream are plain token deltas, and deciding "has content" for them
//! without serde is most of the scanner's speed. [`quick_content`] accepts
//! only payloads serde certainly parses the same way and hands everything
//! else to the full parse; [`fast_path_agrees`] is the oracle the property
//! tests and the fuzzer hold it to. The request path never runs the oracle.
//!
//! One cohesive thing (a small validating JSON cursor), so longer than most files.

use super::ResponseStats;

/// Whether the fast path, where it decides `payload` (one `data:` payload of
/// an OpenAI-dialect stream), decides it as the full parse would: the same "has content" and nothing
/// else recorded. For tests and fuzzing.
pub fn fast_path_agrees(payload: &[u8]) -> bool {
    let Some(has_content) = quick_content(payload) else {
        return true;
    };
    let mut full = ResponseStats::default();
    let full_content = full.absorb_parsed(payload);
    full_content == has_content && full == ResponseStats::default()
}

/// Nesting the fast path follows inside a value it skips; deeper events take
/// the full parse.
const QUICK_MAX_DEPTH: u32 = 16;

/// Whether the stream event `payload` carries content, decided without serde,
/// or `None` when the full parse must decide.
///
/// `Some` only for a payload that `serde_json::from_slice::<Event>` certainly
/// parses, with no `usage`, `timings` or `error` and every `finish_reason`
/// null or absent: then "has content" is the event's only effect. It checks
/// the whole payload: valid UTF-8, JSON syntax as strict as serde_json's,
/// one top-level object, `choices` null or an array of objects, `delta` null
/// or an object. It gives up (`None`) on whatever it does not need to handle:
/// keys of those objects spelled with escapes, duplicate known keys (a serde
/// error), deep nesting, a non-null `finish_reason` or `tool_calls`, any
/// `usage`, `timings` or `error` key.
pub(super) fn quick_content(payload: &[u8]) -> Option<bool> {
    std::str::from_utf8(payload).ok()?;
    let mut q = Quick { b: payload, i: 0 };
    if q.peek()? != b'{' {
        return None;
    }
    q.i += 1;
    let mut has_content = false;
    let mut seen_choices = false;
    let mut first = true;
    while let Some(key) = q.next_key(&mut first, true)? {
        match key {
            b"choices" => {
                first_time(&mut seen_choices)?;
                has_content = q.choices()?;
            }
            b"usage" | b"timings" | b"error" => return None,
            _ => q.skip_value(QUICK_MAX_DEPTH)?,
        }
    }
    if q.peek().is_some() {
        return None; // trailing characters
    }
    Some(has_content)
}

/// `Some` the first time a key is seen in an object, `None` after: a
/// duplicate known key is a serde error, which the fast path leaves to it.
fn first_time(seen: &mut bool) -> Option<()> {
    (!std::mem::replace(seen, true)).then_some(())
}

/// A cursor over one JSON payload. Every method returns `None` as soon as the
/// input is malformed or outside what the fast path handles.
struct Quick<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Quick<'a> {
    /// The next byte after JSON whitespace (not consumed); `None` at the end.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&c) = self.b.get(self.i) {
            if !matches!(c, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(c);
            }
            self.i += 1;
        }
        None
    }

    /// Inside an object: the next member's key (raw, between the quotes) with
    /// its `:` consumed, or `Some(None)` after the closing `}`. With `plain`,
    /// a key containing an escape gives up (it may spell a known name).
    fn next_key(&mut self, first: &mut bool, plain: bool) -> Option<Option<&'a [u8]>> {
        let mut c = self.peek()?;
        if c == b'}' {
            self.i += 1;
            return Some(None);
        }
        if !*first {
            if c != b',' {
                return None;
            }
            self.i += 1;
            c = self.peek()?;
        }
        *first = false;
        if c != b'"' {
            return None;
        }
        self.i += 1;
        let (key, escaped) = self.string()?;
        if plain && escaped {
            return None;
        }
        if self.peek()? != b':' {
            return None;
        }
        self.i += 1;
        Some(Some(key))
    }

    /// Inside an array: whether an element follows (not consumed); `false`
    /// after the closing `]`.
    fn next_element(&mut self, first: &mut bool) -> Option<bool> {
        let c = self.peek()?;
        if c == b']' {
            self.i += 1;
            return Some(false);
        }
        if !*first {
            if c != b',' {
                return None;
            }
            self.i += 1;
        }
        *first = false;
        Some(true)
    }

    /// After an opening quote: the string's raw bytes and whether it has an
    /// escape. Rejects what serde_json rejects: control characters, unknown
    /// escapes, `\u` without four hex digits, a missing closing quote.
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        let start = self.i;
        let mut escaped = false;
        loop {
            self.skip_plain();
            let c = *self.b.get(self.i)?;
            self.i += 1;
            match c {
                b'"' => return Some((&self.b[start..self.i - 1], escaped)),
                b'\\' => {
                    escaped = true;
                    match *self.b.get(self.i)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                        b'u' => {
                            let hex = self.b.get(self.i + 1..self.i + 5)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.i += 5;
                        }
                        _ => return None,
                    }
                }
                _ => return None, // a control character
            }
        }
    }

    /// Inside a string: advances to the next `"`, `\` or control character
    /// (or the end), eight bytes at a time. The same word trick as
    /// serde_json's: in each word, the lowest flagged byte is exactly the
    /// first such byte (borrows only carry into higher bytes).
    fn skip_plain(&mut self) {
        const ONES: u64 = u64::MAX / 255;
        const HIGH: u64 = ONES << 7;
        while let Some(word) = self.b.get(self.i..self.i + 8) {
            let x = u64::from_le_bytes(word.try_into().unwrap_or_default());
            let control = x.wrapping_sub(ONES * 0x20) & !x;
            let q = x ^ (ONES * u64::from(b'"'));
            let quote = q.wrapping_sub(ONES) & !q;
            let bs = x ^ (ONES * u64::from(b'\\'));
            let backslash = bs.wrapping_sub(ONES) & !bs;
            let found = (control | quote | backslash) & HIGH;
            if found != 0 {
                self.i += found.trailing_zeros() as usize / 8;
                return;
            }
            self.i += 8;
        }
        while self
            .b
            .get(self.i)
            .is_some_and(|&c| c != b'"' && c != b'\\' && c >= 0x20)
        {
            self.i += 1;
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        self.i - start
    }

    /// A number, by JSON's grammar (serde_json checks no range for a value it skips).
    fn number(&mut self) -> Option<()> {
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match *self.b.get(self.i)? {
            b'0' => {
                self.i += 1;
                if self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
                    return None;
                }
            }
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if !self.b[self.i..].starts_with(word) {
            return None;
        }
        self.i += word.len();
        Some(())
    }

    /// Skips one value, checking it; `depth` bounds its nesting.
    fn skip_value(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.string()?;
            }
            b'{' => {
                let depth = depth.checked_sub(1)?;
                self.i += 1;
                let mut first = true;
                while self.next_key(&mut first, false)?.is_some() {
                    self.skip_value(depth)?;
                }
            }
            b'[' => {
                let depth = depth.checked_sub(1)?;
                self.i += 1;
                let mut first = true;
                while self.next_element(&mut first)? {
                    self.skip_value(depth)?;
                }
            }
            b'n' => self.literal(b"null")?,
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        Some(())
    }

    /// Skips a value that serde reads as `Option<&RawValue>`: `None` for
    /// null, else whether it counts as content (anything but `""`).
    fn raw_content(&mut self) -> Option<Option<bool>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(None);
        }
        let start = self.i;
        self.skip_value(QUICK_MAX_DEPTH)?;
        Some(Some(&self.b[start..self.i] != b"\"\""))
    }

    /// The value of `choices`: null, or an array of choice objects.
    fn choices(&mut self) -> Option<bool> {
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                return Some(false);
            }
            b'[' => self.i += 1,
            _ => return None,
        }
        let mut has_content = false;
        let mut first = true;
        while self.next_element(&mut first)? {
            has_content |= self.choice()?;
        }
        Some(has_content)
    }

    /// One choice object: whether it has content (`delta.reasoning_content`,
    /// or `delta.content`, else `text`).
    fn choice(&mut self) -> Option<bool> {
        if self.peek()? != b'{' {
            return None; // serde also reads a struct from an array: leave that to it
        }
        self.i += 1;
        let (mut delta, mut text) = (None, None);
        let (mut seen_delta, mut seen_text, mut seen_finish) = (false, false, false);
        let mut first = true;
        while let Some(key) = self.next_key(&mut first, true)? {
            match key {
                b"delta" => {
                    first_time(&mut seen_delta)?;
                    delta = self.delta()?;
                }
                b"text" => {
                    first_time(&mut seen_text)?;
                    text = self.raw_content()?;
                }
                b"finish_reason" => {
                    first_time(&mut seen_finish)?;
                    if self.peek()? != b'n' {
                        return None; // a reason: the full parse records it
                    }
                    self.literal(b"null")?;
                }
                _ => self.skip_value(QUICK_MAX_DEPTH)?,
            }
        }
        let (content, generated) = delta.unwrap_or((None, false));
        Some(generated || content.or(text) == Some(true))
    }

    /// The value of `delta`: `None` for null, else whether its `content`
    /// counts as content (`None` for none or null) and whether its
    /// `reasoning_content` does. A `tool_calls` other than null gives up.
    fn delta(&mut self) -> Option<Option<(Option<bool>, bool)>> {
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                return Some(None);
            }
            b'{' => self.i += 1,
            _ => return None,
        }
        let (mut content, mut reasoning) = (None, false);
        let (mut seen_content, mut seen_reasoning, mut seen_tools) = (false, false, false);
        let mut first = true;
        while let Some(key) = self.next_key(&mut first, true)? {
            match key {
                b"content" => {
                    first_time(&mut seen_content)?;
                    content = self.raw_content()?;
                }
                b"reasoning_content" => {
                    first_time(&mut seen_reasoning)?;
                    reasoning = self.raw_content()? == Some(true);
                }
                b"tool_calls" => {
                    first_time(&mut seen_tools)?;
                    if self.peek()? != b'n' {
                        return None; // tool-call deltas: the full parse reads them
                    }
                    self.literal(b"null")?;
                }
                _ => self.skip_value(QUICK_MAX_DEPTH)?,
            }
        }
        Some(Some((content, reasoning)))
    }
}
