//! PLACEHOLDER so the text codec's delegation compiles; the integrator drops this commit for the real
//! meta codec, which offers the same five names with these signatures.

use super::{After, Limits, Parse, Route};
use crate::shard::Shard;

/// One meta command line (placeholder: the raw line, without its terminator).
#[derive(Debug)]
pub struct Request<'a> {
    pub line: &'a [u8],
}

/// Placeholder: takes one line, never a data block.
pub fn parse<'a>(buf: &'a [u8], _limits: &Limits) -> Parse<Request<'a>> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(newline) => Parse::Request { request: Request { line: &buf[..newline] }, consumed: newline + 1 },
        None => Parse::Incomplete,
    }
}

/// Placeholder: answered by the connection.
pub fn route<'r>(_req: &'r Request<'_>) -> Route<'r> {
    Route::Connection
}

/// Placeholder: writes nothing.
pub fn execute(_shard: &mut Shard, _req: &Request<'_>, _out: &mut Vec<u8>) {}

/// Placeholder: writes nothing.
pub fn answer(_req: &Request<'_>, _out: &mut Vec<u8>) -> After {
    After::Continue
}
