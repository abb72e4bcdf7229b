pub mod gateway;
pub mod mock_llama;
pub mod unit;
