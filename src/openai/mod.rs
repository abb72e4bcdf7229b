//! The wire formats the gateway reads: request bodies (`model`, token
//! fields, the byte-exact rewrite), the three SSE dialects read on the side
//! for accounting (OpenAI chunks, the Responses API, Anthropic Messages), and
//! the model catalogue.
//!
//! Pure logic, unit-tested with plain inputs. Must not import `gateway`,
//! `upstream` or Pingora.

pub mod body;
pub mod models;
pub mod prefix;
pub mod sse;

/// A writer that only counts: how long a rendering is, measured before it
/// is rendered into a buffer of exactly that size (a full `Vec` becomes
/// `Bytes` without a second allocation).
pub(crate) struct ByteCount(pub usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
