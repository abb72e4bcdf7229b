pub mod gateway;
pub mod http;
pub mod unit;
