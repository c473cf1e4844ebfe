//! Reading GGUF files: the header, the metadata key/value table, the tensor
//! descriptions and the location of each tensor's bytes.

mod cursor;
mod reader;
mod types;
mod value;

pub use reader::{GgufFile, TensorInfo, DEFAULT_ALIGNMENT};
pub use types::GgmlType;
pub use value::MetaValue;
