//! How a request handler ends early.

use pingora_error::Error;

use crate::errors::ApiError;

#[derive(Debug)]
pub enum GatewayError {
    /// Answer the client with this error (nothing was written yet).
    Api(ApiError),
    /// The client left; there is nobody to answer.
    ClientGone,
    /// The response already started and must be cut off.
    Aborted(Box<Error>),
}

impl From<ApiError> for GatewayError {
    fn from(e: ApiError) -> Self {
        GatewayError::Api(e)
    }
}

impl From<Box<Error>> for GatewayError {
    fn from(e: Box<Error>) -> Self {
        GatewayError::Aborted(e)
    }
}
