//! The file: header, metadata, tensor directory, and the tensor data in place.
//!
//! Layout (GGUF v2/v3, little-endian): magic `GGUF`, version, tensor count, metadata count, the
//! metadata pairs, the tensor directory (name, dims, type, offset), padding to the alignment
//! (`general.alignment`, default 32), then the data, each tensor at its offset from there.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use memmap2::Mmap;

use crate::metadata::Value;
use crate::types::GgmlType;
use crate::GgufError;

/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; deeper than this is a corrupt file, not a model.
const MAX_NESTING: usize = 4;

/// One tensor of the directory, checked against the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (innermost), as in the file.
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// Where its data starts, from the start of the file.
    pub start: usize,
    pub bytes: usize,
}

impl TensorInfo {
    pub fn len(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape outermost first (numpy's and ONNX's order).
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A GGUF file, read and checked: metadata by key, tensors by name, data in place.
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    bytes: Bytes,
}

impl Gguf {
    /// Maps the file and reads its header. The data is not read until asked for.
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only and private; a file changed under a running process is
        // outside what we guard against (llama.cpp maps model files alike).
        let map = unsafe { Mmap::map(&file)? };
        Gguf::parse(Bytes::Mapped(map))
    }

    /// A file already in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf, GgufError> {
        Gguf::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<Gguf, GgufError> {
        let mut r = Cursor {
            bytes: &bytes,
            at: 0,
        };
        let magic: [u8; 4] = r
            .take(4)
            .map_err(|_| GgufError::NotGguf {
                found: head(&bytes),
            })?
            .try_into()
            .unwrap();
        if &magic != b"GGUF" {
            return Err(GgufError::NotGguf { found: magic });
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let tensor_count = r.count("tensor count")?;
        let metadata_count = r.count("metadata count")?;

        let mut metadata = BTreeMap::new();
        for _ in 0..metadata_count {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind, 0).map_err(|e| match e {
                GgufError::Corrupt(what) => GgufError::Corrupt(format!("metadata '{key}': {what}")),
                other => other,
            })?;
            metadata.insert(key, value);
        }

        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(GgufError::BadMetadata {
                        key: "general.alignment".into(),
                        problem: format!("{v:?} is not a power of two"),
                    })
                }
            },
        };

        let mut directory = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(bad(
                    &name,
                    format!("has {n_dims} dimensions (ggml tensors have 1 to {MAX_DIMS})"),
                ));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<Result<Vec<_>, _>>()?;
            let kind = r.u32()?;
            let offset = r.u64()?;
            directory.push((name, dims, kind, offset));
        }
        let data_start = r.at.next_multiple_of(alignment);

        let mut tensors = Vec::with_capacity(directory.len());
        let mut names = std::collections::HashSet::new();
        for (name, dims, kind, offset) in directory {
            if !names.insert(name.clone()) {
                return Err(bad(&name, "appears twice in the tensor directory".into()));
            }
            let kind = GgmlType::from_id(kind).map_err(|kind| GgufError::UnsupportedType {
                tensor: name.clone(),
                kind,
            })?;
            if dims.contains(&0) {
                return Err(bad(&name, format!("has an empty dimension: {dims:?}")));
            }
            let len = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .ok_or_else(|| bad(&name, format!("has dimensions {dims:?} that overflow")))?;
            if dims[0] % kind.block_len() as u64 != 0 {
                return Err(bad(
                    &name,
                    format!(
                        "has rows of {} values, which are not whole {kind} blocks of {}",
                        dims[0],
                        kind.block_len()
                    ),
                ));
            }
            let size = kind.bytes_for(len).expect("whole blocks checked above");
            if offset % alignment as u64 != 0 {
                return Err(bad(
                    &name,
                    format!("has its data at offset {offset}, which is not aligned to {alignment}"),
                ));
            }
            let start = (data_start as u64).checked_add(offset);
            let end = start.and_then(|s| s.checked_add(size));
            match (start, end) {
                (Some(start), Some(end)) if end <= bytes.len() as u64 => tensors.push(TensorInfo {
                    name,
                    dims,
                    kind,
                    start: start as usize,
                    bytes: (end - start) as usize,
                }),
                _ => {
                    return Err(GgufError::Corrupt(format!(
                        "tensor '{name}' ({kind}, dims {dims:?}, {size} bytes at offset {offset}) lies past the end of the \
                         file ({} bytes): truncated?",
                        bytes.len()
                    )))
                }
            }
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let value = self.require(key)?;
        value
            .as_u64()
            .ok_or_else(|| wrong_type(key, value, "an unsigned integer"))
    }

    /// A required float.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let value = self.require(key)?;
        value
            .as_f32()
            .ok_or_else(|| wrong_type(key, value, "a float"))
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let value = self.require(key)?;
        value
            .as_str()
            .ok_or_else(|| wrong_type(key, value, "a string"))
    }

    /// `general.architecture`: which keys and tensors the rest of the file has.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::BadMetadata {
                key: key.into(),
                problem: "missing".into(),
            })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's bytes as stored (quantized blocks, or raw floats).
    pub fn data(&self, tensor: &TensorInfo) -> &[u8] {
        &self.bytes[tensor.start..tensor.start + tensor.bytes]
    }

    /// The tensor's values in f32, exactly as the reference dequantizer gives them.
    pub fn dequantize(&self, tensor: &TensorInfo) -> Vec<f32> {
        crate::dequantize(tensor.kind, self.data(tensor))
    }
}

fn head(bytes: &[u8]) -> [u8; 4] {
    let mut found = [0; 4];
    let n = bytes.len().min(4);
    found[..n].copy_from_slice(&bytes[..n]);
    found
}

fn bad(tensor: &str, problem: String) -> GgufError {
    GgufError::BadTensor {
        tensor: tensor.into(),
        problem,
    }
}

fn wrong_type(key: &str, value: &Value, wanted: &str) -> GgufError {
    GgufError::BadMetadata {
        key: key.into(),
        problem: format!("is a {}, not {wanted}", value.type_name()),
    }
}

/// Reads little-endian values, failing (not panicking) at the end of the bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                GgufError::Corrupt(format!(
                    "it ends at byte {} where {n} more bytes were expected at {}",
                    self.bytes.len(),
                    self.at
                ))
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        Ok(self.take(N)?.try_into().expect("N bytes taken"))
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of things that each take at least a byte: more than the bytes left is corrupt.
    fn count(&mut self, what: &str) -> Result<usize, GgufError> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return Err(GgufError::Corrupt(format!(
                "a {what} of {n} with {left} bytes left"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.count("string length")?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            GgufError::Corrupt(format!(
                "a string that is not UTF-8 ({e}) at byte {}",
                self.at - n
            ))
        })
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<Value, GgufError> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Corrupt(format!("a bool of value {b}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(GgufError::Corrupt(format!(
                        "arrays nested deeper than {MAX_NESTING}"
                    )));
                }
                let element = self.u32()?;
                let n = self.count("array length")?;
                let mut values = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    values.push(self.value(element, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(GgufError::Corrupt(format!(
                    "a value of unknown type {other}"
                )))
            }
        })
    }
}
