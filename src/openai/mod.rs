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
