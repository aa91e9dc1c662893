pub mod arena;
pub mod checkpoint;
pub mod dtype;
pub mod error;
pub mod lossless;
pub mod pin;
pub mod plan;
pub mod reader;
pub mod safetensors;
pub mod store;

pub use checkpoint::{Checkpoint, TensorInfo};
pub use dtype::Dtype;
pub use error::{Error, Result};
pub use reader::{ReadOptions, ReaderKind};
pub use store::{Job, Store, StoreOptions};
