//! Reading a GGUF file: the header, every metadata entry, the tensor infos and the location of
//! each tensor's data, all validated against the file's size when the file is opened.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::value::{Array, Value};
use super::{dequant, GgmlType, GgufError};

/// The data alignment when a file has no `general.alignment` entry.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// Deepest nesting of arrays inside arrays accepted; real files nest none. The limit keeps a
/// crafted file from exhausting the stack.
const MAX_ARRAY_DEPTH: usize = 8;

/// One tensor as described by its tensor info.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (fastest-varying) one.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Number of elements (product of `dims`; checked not to overflow).
    pub elements: u64,
    /// Bytes of data; `None` for a type this reader does not know.
    pub byte_len: Option<u64>,
}

impl TensorInfo {
    /// The shape as row-major frameworks (safetensors, PyTorch, numpy) write it: the ggml dims
    /// reversed, outermost first. A ggml `[576, 49152]` embedding is `[49152, 576]` here.
    pub fn row_major_shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// The bytes of a file: a read-only memory map, or a buffer for files built in memory.
enum Bytes {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An open, validated GGUF file. Tensor data stays in the memory map until asked for.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Opens and validates a file: magic, version 2 or 3, every metadata entry, every tensor
    /// info, and that each tensor's data lies inside the file without overlapping another's.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |e| GgufError::Io {
            path: path.to_path_buf(),
            error: e,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let bytes = if len == 0 {
            // An empty file cannot be mapped; it fails validation below all the same.
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private; this process never writes the file. A
            // concurrent writer in another process is outside the contract, as for every
            // mmap-based checkpoint loader.
            Bytes::Map(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        Self::parse(path.to_path_buf(), bytes)
    }

    /// Reads a GGUF file held in memory (built by a test or received over a network); `name`
    /// stands in for the path in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(name.into(), Bytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<Self, GgufError> {
        let h = match parse_header(&bytes) {
            Ok(h) => h,
            Err(msg) => return Err(GgufError::Format { path, msg }),
        };
        let meta_index = h
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = h
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path,
            bytes,
            version: h.version,
            alignment: h.alignment,
            data_start: h.data_start,
            metadata: h.metadata,
            meta_index,
            tensors: h.tensors,
            tensor_index,
        })
    }

    /// The file's path (or the name given to [`GgufFile::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the data section in the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// Every metadata entry in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// An error about metadata entry `key` of this file, for callers that find a value unusable.
    pub fn meta_error(&self, key: &str, msg: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }

    /// An error about tensor `name` of this file, for callers that find a tensor unusable.
    pub fn tensor_error(&self, name: &str, msg: impl Into<String>) -> GgufError {
        GgufError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            msg: msg.into(),
        }
    }

    /// A metadata value that must be present.
    pub fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| self.meta_error(key, "missing"))
    }

    /// A metadata value that must be a non-negative integer (of any width).
    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64().ok_or_else(|| {
            self.meta_error(key, format!("expected a non-negative integer, found {v:?}"))
        })
    }

    /// A metadata value that must be a float (f32 or f64).
    pub fn require_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| {
            self.meta_error(key, format!("expected a float, found {}", v.type_name()))
        })
    }

    /// A metadata value that must be a string.
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| {
            self.meta_error(key, format!("expected a string, found {}", v.type_name()))
        })
    }

    /// A metadata value that must be an array.
    pub fn require_array(&self, key: &str) -> Result<&Array, GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| {
            self.meta_error(key, format!("expected an array, found {}", v.type_name()))
        })
    }

    /// Every tensor in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (possibly quantized) bytes of a tensor.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8], GgufError> {
        let t = self
            .tensor(name)
            .ok_or_else(|| self.tensor_error(name, "no such tensor"))?;
        let len = t.byte_len.ok_or_else(|| {
            self.tensor_error(
                name,
                format!("{} is not a tensor type this reader knows", t.ggml_type),
            )
        })?;
        // In range and in usize: checked against the file length at open.
        let start = (self.data_start + t.offset) as usize;
        Ok(&self.bytes[start..start + len as usize])
    }

    /// A tensor's values as f32, in storage order (ggml `dims[0]` fastest, which is the
    /// row-major order of [`TensorInfo::row_major_shape`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let data = self.tensor_data(name)?;
        let t = &self.tensors[self.tensor_index[name]];
        dequant::dequantize(t.ggml_type, data).map_err(|e| self.tensor_error(name, e.to_string()))
    }
}

/// What the header says, validated.
struct Header {
    version: u32,
    alignment: u64,
    data_start: u64,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
}

/// A read past the end of the buffer.
struct Short {
    at: usize,
    need: u64,
}

/// A position in the file's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Short> {
        if n > self.remaining() {
            return Err(Short {
                at: self.pos,
                need: n,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Short> {
        Ok(self
            .take(N as u64)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self) -> Result<u32, Short> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Short> {
        self.array().map(u64::from_le_bytes)
    }

    /// A GGUF string: u64 length, then that many bytes, which must be UTF-8.
    fn string(&mut self) -> Result<String, String> {
        let start = self.pos;
        let len = self.u64().map_err(|s| self.short(s, "a string length"))?;
        let bytes = self
            .take(len)
            .map_err(|s| self.short(s, &format!("a string of {len} bytes")))?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| format!("string at byte {start} is not UTF-8: {e}"))
    }

    /// The message of a read past the end.
    fn short(&self, s: Short, what: &str) -> String {
        format!(
            "truncated: {what} at byte {} needs {} bytes but the file ends at byte {}",
            s.at,
            s.need,
            self.buf.len()
        )
    }
}

fn parse_header(buf: &[u8]) -> Result<Header, String> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.take(4).map_err(|s| c.short(s, "the magic `GGUF`"))?;
    if magic != b"GGUF" {
        return Err(format!(
            "bad magic {magic:02x?} (expected the bytes `GGUF`)"
        ));
    }
    let version = c.u32().map_err(|s| c.short(s, "the version"))?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(
                "GGUF version 1 is not supported (it predates 64-bit counts; re-convert the model)"
                    .into(),
            )
        }
        v if (1..=3).contains(&v.swap_bytes()) => {
            return Err(format!(
                "big-endian GGUF (version {}) is not supported",
                v.swap_bytes()
            ))
        }
        v => {
            return Err(format!(
                "GGUF version {v} is not supported (this reader reads versions 2 and 3)"
            ))
        }
    }
    let n_tensors = c.u64().map_err(|s| c.short(s, "the tensor count"))?;
    let n_kv = c.u64().map_err(|s| c.short(s, "the metadata count"))?;
    // Smallest encodings: a metadata entry is a key length, a type and a 1-byte value; a tensor
    // info is a name length, a dimension count, a type and an offset.
    check_count(&c, n_kv, 8 + 4 + 1, "metadata entries")?;
    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv as usize);
    let mut seen = HashMap::new();
    for i in 0..n_kv {
        let key = c
            .string()
            .map_err(|e| format!("metadata entry {i}: key: {e}"))?;
        let ty = c
            .u32()
            .map_err(|s| c.short(s, &format!("the type of metadata `{key}`")))?;
        let value = read_value(&mut c, ty, 0).map_err(|e| format!("metadata `{key}`: {e}"))?;
        if seen.insert(key.clone(), i).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        metadata.push((key, value));
    }
    let alignment = match seen.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(&i) => match metadata[i as usize].1.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(format!(
                    "`general.alignment` must be a power of two, found {:?}",
                    metadata[i as usize].1
                ))
            }
        },
    };
    check_count(&c, n_tensors, 8 + 4 + 4 + 8, "tensor infos")?;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
    let mut names = HashMap::new();
    for i in 0..n_tensors {
        let t = read_tensor_info(&mut c, alignment).map_err(|e| format!("tensor info {i}: {e}"))?;
        if names.insert(t.name.clone(), i).is_some() {
            return Err(format!("tensor name `{}` appears twice", t.name));
        }
        tensors.push(t);
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    check_data_ranges(&tensors, data_start, buf.len() as u64)?;
    Ok(Header {
        version,
        alignment,
        data_start,
        metadata,
        tensors,
    })
}

/// Refuses a count of items that cannot fit in what is left of the file, before anything is
/// allocated for them.
fn check_count(c: &Cursor<'_>, n: u64, min_bytes: u64, what: &str) -> Result<(), String> {
    if n.checked_mul(min_bytes).is_none_or(|b| b > c.remaining()) {
        return Err(format!(
            "{n} {what} declared at byte {} but only {} bytes follow (corrupt count or truncated file)",
            c.pos,
            c.remaining()
        ));
    }
    Ok(())
}

/// Bytes of the smallest encoding of a value of type `ty`.
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

fn read_value(c: &mut Cursor<'_>, ty: u32, depth: usize) -> Result<Value, String> {
    let at = c.pos;
    let short = |c: &Cursor<'_>, s| c.short(s, "the value");
    Ok(match ty {
        0 => Value::U8(c.array().map(u8::from_le_bytes).map_err(|s| short(c, s))?),
        1 => Value::I8(c.array().map(i8::from_le_bytes).map_err(|s| short(c, s))?),
        2 => Value::U16(c.array().map(u16::from_le_bytes).map_err(|s| short(c, s))?),
        3 => Value::I16(c.array().map(i16::from_le_bytes).map_err(|s| short(c, s))?),
        4 => Value::U32(c.array().map(u32::from_le_bytes).map_err(|s| short(c, s))?),
        5 => Value::I32(c.array().map(i32::from_le_bytes).map_err(|s| short(c, s))?),
        6 => Value::F32(c.array().map(f32::from_le_bytes).map_err(|s| short(c, s))?),
        7 => Value::Bool(bool_at(c.array::<1>().map_err(|s| short(c, s))?[0], at)?),
        8 => Value::String(c.string()?),
        9 => Value::Array(read_array(c, depth)?),
        10 => Value::U64(c.array().map(u64::from_le_bytes).map_err(|s| short(c, s))?),
        11 => Value::I64(c.array().map(i64::from_le_bytes).map_err(|s| short(c, s))?),
        12 => Value::F64(c.array().map(f64::from_le_bytes).map_err(|s| short(c, s))?),
        t => {
            return Err(format!(
                "unknown value type {t} at byte {}",
                at.saturating_sub(4)
            ))
        }
    })
}

fn bool_at(b: u8, at: usize) -> Result<bool, String> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(format!("bool at byte {at} is {b}, not 0 or 1")),
    }
}

/// Reads `n` fixed-size little-endian numbers.
fn numbers<T, const N: usize>(
    c: &mut Cursor<'_>,
    n: u64,
    f: fn([u8; N]) -> T,
) -> Result<Vec<T>, String> {
    let bytes = c
        .take(n * N as u64)
        .map_err(|s| c.short(s, &format!("an array of {n} elements")))?;
    Ok(bytes
        .chunks_exact(N)
        .map(|b| f(b.try_into().expect("chunks of N")))
        .collect())
}

fn read_array(c: &mut Cursor<'_>, depth: usize) -> Result<Array, String> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(format!(
            "arrays nested deeper than {MAX_ARRAY_DEPTH} at byte {}",
            c.pos
        ));
    }
    let ty = c.u32().map_err(|s| c.short(s, "an array's element type"))?;
    let n = c.u64().map_err(|s| c.short(s, "an array's length"))?;
    let min = min_value_bytes(ty)
        .ok_or_else(|| format!("unknown array element type {ty} at byte {}", c.pos - 12))?;
    check_count(c, n, min, "array elements")?;
    Ok(match ty {
        0 => Array::U8(numbers(c, n, u8::from_le_bytes)?),
        1 => Array::I8(numbers(c, n, i8::from_le_bytes)?),
        2 => Array::U16(numbers(c, n, u16::from_le_bytes)?),
        3 => Array::I16(numbers(c, n, i16::from_le_bytes)?),
        4 => Array::U32(numbers(c, n, u32::from_le_bytes)?),
        5 => Array::I32(numbers(c, n, i32::from_le_bytes)?),
        6 => Array::F32(numbers(c, n, f32::from_le_bytes)?),
        7 => {
            let at = c.pos;
            let raw = numbers(c, n, u8::from_le_bytes)?;
            Array::Bool(
                raw.iter()
                    .enumerate()
                    .map(|(i, &b)| bool_at(b, at + i))
                    .collect::<Result<_, _>>()?,
            )
        }
        8 => Array::String((0..n).map(|_| c.string()).collect::<Result<_, _>>()?),
        9 => Array::Array(
            (0..n)
                .map(|_| read_array(c, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        10 => Array::U64(numbers(c, n, u64::from_le_bytes)?),
        11 => Array::I64(numbers(c, n, i64::from_le_bytes)?),
        _ => Array::F64(numbers(c, n, f64::from_le_bytes)?),
    })
}

fn read_tensor_info(c: &mut Cursor<'_>, alignment: u64) -> Result<TensorInfo, String> {
    let name = c.string().map_err(|e| format!("name: {e}"))?;
    let n_dims = c
        .u32()
        .map_err(|s| c.short(s, &format!("the dimension count of `{name}`")))?;
    if n_dims > MAX_DIMS {
        return Err(format!(
            "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
        ));
    }
    let dims = (0..n_dims)
        .map(|_| {
            c.u64()
                .map_err(|s| c.short(s, &format!("the dimensions of `{name}`")))
        })
        .collect::<Result<Vec<u64>, _>>()?;
    let ty = GgmlType(
        c.u32()
            .map_err(|s| c.short(s, &format!("the type of `{name}`")))?,
    );
    let offset = c
        .u64()
        .map_err(|s| c.short(s, &format!("the data offset of `{name}`")))?;
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| {
            acc.checked_mul(d).filter(|&n| n <= i64::MAX as u64)
        })
        .ok_or_else(|| {
            format!("tensor `{name}`: dimensions {dims:?} overflow the element count")
        })?;
    let byte_len = match ty.block() {
        None => None,
        Some((blk, blk_bytes)) => {
            let row = dims.first().copied().unwrap_or(1);
            if !row.is_multiple_of(blk) {
                return Err(format!(
                    "tensor `{name}`: rows of {row} elements are not a whole number of {ty} blocks of {blk}"
                ));
            }
            Some(
                (elements / blk)
                    .checked_mul(blk_bytes)
                    .ok_or_else(|| format!("tensor `{name}`: data size overflows"))?,
            )
        }
    };
    if !offset.is_multiple_of(alignment) {
        return Err(format!(
            "tensor `{name}`: data offset {offset} is not a multiple of the alignment {alignment}"
        ));
    }
    Ok(TensorInfo {
        name,
        dims,
        ggml_type: ty,
        offset,
        elements,
        byte_len,
    })
}

/// Every tensor of known size must lie inside the file, and no two may overlap.
fn check_data_ranges(tensors: &[TensorInfo], data_start: u64, file_len: u64) -> Result<(), String> {
    let mut ranges = Vec::with_capacity(tensors.len());
    for t in tensors {
        let Some(len) = t.byte_len else { continue };
        let start = data_start.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len && end <= usize::MAX as u64 => {
                ranges.push((start, end, t.name.as_str()))
            }
            _ => {
                return Err(format!(
                    "tensor `{}`: {len} bytes of {} data at offset {} (byte {}) extend past the end of the file \
                     ({file_len} bytes; truncated file?)",
                    t.name,
                    t.ggml_type,
                    t.offset,
                    data_start.saturating_add(t.offset)
                ))
            }
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!(
                "the data of tensors `{}` and `{}` overlap",
                w[0].2, w[1].2
            ));
        }
    }
    Ok(())
}
