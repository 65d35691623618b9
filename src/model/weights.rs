//! Every tensor of a Llama model, loaded by its Hugging Face name from a
//! [`Checkpoint`], plain or compressed, and checked against the
//! [`LlamaConfig`].
//!
//! Matrices stay BF16 (as little-endian bytes) in one of two forms, chosen by [`WeightMode`]:
//! decoded once at load, or kept in their compressed parts and decoded chunk by chunk by whoever
//! multiplies with them ([`CompressedMatrix::decode_chunk`]). Norm vectors become f32. Nothing
//! here knows how the model is run; the device layer consumes these weights.
//!
//! Invariant: every matrix has exactly the shape the config implies and every byte of it was
//! checksum-verified against the original checkpoint when it was loaded.

use std::borrow::Cow;

use safetensors::Dtype;

use super::LlamaConfig;
use crate::codec::{ans, model::raw_len, CodecError};
use crate::container::meta::{part_name, Encoding};
use crate::container::{Checkpoint, ContainerError, TensorEntry};

/// What can go wrong loading the weights of a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightError {
    /// Reading or decoding the checkpoint failed.
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// The model needs a tensor the checkpoint does not have.
    #[error("tensor `{tensor}` is missing from the checkpoint")]
    Missing {
        /// Its Hugging Face name.
        tensor: String,
    },
    /// A tensor whose shape disagrees with config.json.
    #[error("tensor `{tensor}` has shape {actual:?}, but config.json implies {expected:?}")]
    Shape {
        /// Its name.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored.
        actual: Vec<usize>,
    },
    /// A tensor of a dtype the engine does not compute with.
    #[error("tensor `{tensor}` is {dtype}; the engine needs {expected}")]
    Dtype {
        /// Its name.
        tensor: String,
        /// Its dtype.
        dtype: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// On-the-fly decoding was asked of a checkpoint that is not compressed.
    #[error(
        "{0}: on-the-fly weight decoding needs a compressed checkpoint (run `unweight compress`)"
    )]
    NotCompressed(std::path::PathBuf),
    /// Compressed parts that do not decode.
    #[error("tensor `{tensor}`: {source}")]
    Codec {
        /// Its name.
        tensor: String,
        /// The codec's error.
        source: CodecError,
    },
}

/// How matrices are held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMode {
    /// Decode every matrix once at load into plain BF16.
    Decoded,
    /// Keep compressed matrices compressed and decode them chunk by chunk during each product
    /// (matrices the checkpoint stores raw stay BF16). Needs a compressed checkpoint.
    OnTheFly,
}

impl WeightMode {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            WeightMode::Decoded => "decoded",
            WeightMode::OnTheFly => "on-the-fly",
        }
    }
}

/// A BF16 matrix (row-major, `rows × cols`) in one of its two in-memory forms.
#[derive(Debug)]
pub struct Matrix {
    /// Its Hugging Face name (for error messages).
    pub name: String,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The values.
    pub data: MatrixData,
}

/// The storage of a [`Matrix`].
#[derive(Debug)]
pub enum MatrixData {
    /// Little-endian BF16 bytes, `2 × rows × cols` of them.
    Bf16(Vec<u8>),
    /// The compressed parts.
    Compressed(CompressedMatrix),
}

impl Matrix {
    /// Row `r` as little-endian BF16 bytes, decoding the chunks it lies in when compressed.
    pub fn row(&self, r: usize) -> Result<Cow<'_, [u8]>, WeightError> {
        let (a, b) = (r * self.cols, (r + 1) * self.cols);
        match &self.data {
            MatrixData::Bf16(v) => Ok(Cow::Borrowed(&v[2 * a..2 * b])),
            MatrixData::Compressed(m) => {
                let ce = m.chunk_elems;
                let (c0, c1) = (a / ce, (b - 1) / ce + 1);
                let mut buf = vec![0u8; 2 * (m.chunk_range(c1 - 1).end - c0 * ce)];
                for c in c0..c1 {
                    let rg = m.chunk_range(c);
                    let off = 2 * (rg.start - c0 * ce);
                    m.decode_chunk(c, &mut buf[off..off + 2 * rg.len()])
                        .map_err(|source| WeightError::Codec {
                            tensor: self.name.clone(),
                            source,
                        })?;
                }
                let s = 2 * (a - c0 * ce);
                Ok(Cow::Owned(buf[s..s + 2 * self.cols].to_vec()))
            }
        }
    }

    /// Bytes the matrix occupies in memory.
    pub fn resident_bytes(&self) -> usize {
        match &self.data {
            MatrixData::Bf16(v) => v.len(),
            MatrixData::Compressed(m) => m.resident_bytes(),
        }
    }
}

/// The stored parts of one compressed BF16 matrix, owned, with the decoding table built once.
pub struct CompressedMatrix {
    /// Elements (= `rows × cols`).
    pub len: usize,
    /// Elements per chunk.
    pub chunk_elems: usize,
    /// The raw plane (see [`crate::codec::model`]).
    raw: Vec<u8>,
    /// Leading mantissa bits coded with the exponent.
    mantissa_bits: u32,
    /// The words of every chunk, followed by [`ans::WORD_PAD_BYTES`] bytes of zero padding.
    exp_words: Vec<u8>,
    offsets: Vec<u32>,
    states: Vec<u32>,
    table: ans::DecodeTable,
}

impl std::fmt::Debug for CompressedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressedMatrix")
            .field("len", &self.len)
            .field("chunk_elems", &self.chunk_elems)
            .field("chunks", &self.chunks())
            .finish()
    }
}

impl CompressedMatrix {
    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The elements (row-major indices) chunk `c` holds.
    pub fn chunk_range(&self, c: usize) -> std::ops::Range<usize> {
        c * self.chunk_elems..((c + 1) * self.chunk_elems).min(self.len)
    }

    /// Decodes chunk `c` into little-endian BF16 bytes (`out.len() == 2 × chunk_range(c).len()`).
    pub fn decode_chunk(&self, c: usize, out: &mut [u8]) -> Result<(), CodecError> {
        if c >= self.chunks() {
            return Err(CodecError::Invalid(format!(
                "chunk {c} of {}",
                self.chunks()
            )));
        }
        let rg = self.chunk_range(c);
        let st: &[u32; ans::LANES] = self.states[c * ans::LANES..(c + 1) * ans::LANES]
            .try_into()
            .expect("32 states");
        let (w0, w1) = (self.offsets[c] as usize, self.offsets[c + 1] as usize);
        ans::decode_chunk_bytes(
            st,
            &self.exp_words[2 * w0..],
            w1 - w0,
            &self.table,
            &self.raw[raw_len(rg.start, self.mantissa_bits)..raw_len(rg.end, self.mantissa_bits)],
            out,
        )
    }

    /// Bytes held in memory (parts; the decoding table not counted).
    pub fn resident_bytes(&self) -> usize {
        self.raw.len() + self.exp_words.len() + 4 * (self.offsets.len() + self.states.len())
    }

    /// Takes the parts of a tensor encoded in memory (tests, and converting weights without a
    /// checkpoint on disk).
    pub fn from_encoded(enc: &crate::codec::EncodedTensor) -> Self {
        let mut exp_words: Vec<u8> = enc.exp_words.iter().flat_map(|w| w.to_le_bytes()).collect();
        exp_words.resize(exp_words.len() + ans::WORD_PAD_BYTES, 0);
        Self {
            len: enc.len,
            chunk_elems: enc.params.chunk_elems,
            raw: enc.raw.clone(),
            mantissa_bits: enc.params.mantissa_bits,
            exp_words,
            offsets: enc.offsets.clone(),
            states: enc.states.clone(),
            table: ans::DecodeTable::with_model(&enc.table, &enc.model),
        }
    }

    /// Copies the parts of a compressed tensor out of its checkpoint, checking their sizes.
    fn from_checkpoint(ckpt: &Checkpoint, entry: &TensorEntry) -> Result<Self, WeightError> {
        let name = &entry.name;
        let corrupt = |msg: String| WeightError::Codec {
            tensor: name.clone(),
            source: CodecError::Corrupt(msg),
        };
        let meta = entry
            .meta
            .as_ref()
            .and_then(|m| m.rans.as_ref())
            .ok_or_else(|| corrupt("no rans metadata".into()))?;
        let file = &ckpt.files()[entry.file];
        let part = |p: &str| {
            file.read(&part_name(name, p))?
                .ok_or_else(|| corrupt(format!("part `{p}` is missing")))
        };
        let (sm, exp, index) = (part("sm")?, part("exp")?, part("index")?);
        let len = entry.numel();
        let chunks = len.div_ceil(meta.chunk_elems);
        let (off_bytes, st_bytes) = (4 * (chunks + 1), 4 * ans::LANES * chunks);
        if index.len() <= off_bytes + st_bytes
            || sm.len() != raw_len(len, meta.mantissa_bits)
            || exp.len() % 2 != 0
        {
            return Err(corrupt("parts have inconsistent sizes".into()));
        }
        let u32s = |b: &[u8]| {
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>()
        };
        let offsets = u32s(&index[..off_bytes]);
        let states = u32s(&index[off_bytes..off_bytes + st_bytes]);
        if offsets[0] != 0
            || offsets[chunks] as usize != exp.len() / 2
            || offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(corrupt(
                "chunk offsets are not increasing from 0 to the stream end".into(),
            ));
        }
        let (table, model) = crate::codec::tensor::parse_table(
            &index[off_bytes + st_bytes..],
            meta.prob_bits,
            meta.mantissa_bits,
        )
        .map_err(|source| WeightError::Codec {
            tensor: name.clone(),
            source,
        })?;
        let mut exp_words = Vec::with_capacity(exp.len() + ans::WORD_PAD_BYTES);
        exp_words.extend_from_slice(exp);
        exp_words.resize(exp.len() + ans::WORD_PAD_BYTES, 0);
        Ok(Self {
            len,
            chunk_elems: meta.chunk_elems,
            raw: sm.to_vec(),
            mantissa_bits: meta.mantissa_bits,
            exp_words,
            offsets,
            states,
            table: ans::DecodeTable::with_model(&table, &model),
        })
    }
}

/// The weights of one decoder layer.
#[derive(Debug)]
pub struct LayerWeights {
    /// RMSNorm before attention.
    pub input_norm: Vec<f32>,
    /// Query projection, `q_dim × hidden`.
    pub q_proj: Matrix,
    /// Key projection, `kv_dim × hidden`.
    pub k_proj: Matrix,
    /// Value projection, `kv_dim × hidden`.
    pub v_proj: Matrix,
    /// Attention output projection, `hidden × q_dim`.
    pub o_proj: Matrix,
    /// RMSNorm before the MLP.
    pub post_attention_norm: Vec<f32>,
    /// MLP gate, `intermediate × hidden`.
    pub gate_proj: Matrix,
    /// MLP up projection, `intermediate × hidden`.
    pub up_proj: Matrix,
    /// MLP down projection, `hidden × intermediate`.
    pub down_proj: Matrix,
}

/// Every weight of a Llama model.
#[derive(Debug)]
pub struct LlamaWeights {
    /// Token embedding, `vocab × hidden`.
    pub embed_tokens: Matrix,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// The final RMSNorm.
    pub norm: Vec<f32>,
    /// Output projection; `None` when tied to [`LlamaWeights::embed_tokens`].
    pub lm_head: Option<Matrix>,
    /// How the matrices are held.
    pub mode: WeightMode,
}

impl LlamaWeights {
    /// Loads every tensor the config implies, checking names, shapes and dtypes. Every tensor
    /// is checksum-verified (a compressed one by decoding it once, even in
    /// [`WeightMode::OnTheFly`]).
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &LlamaConfig,
        mode: WeightMode,
    ) -> Result<Self, WeightError> {
        if mode == WeightMode::OnTheFly && !ckpt.is_compressed() {
            return Err(WeightError::NotCompressed(ckpt.dir().to_path_buf()));
        }
        let (h, i, q, kv) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        let m = |name: String, rows, cols| load_matrix(ckpt, name, rows, cols, mode);
        let v = |name: String| load_vector(ckpt, name, h);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(LayerWeights {
                input_norm: v(format!("{p}.input_layernorm.weight"))?,
                q_proj: m(format!("{p}.self_attn.q_proj.weight"), q, h)?,
                k_proj: m(format!("{p}.self_attn.k_proj.weight"), kv, h)?,
                v_proj: m(format!("{p}.self_attn.v_proj.weight"), kv, h)?,
                o_proj: m(format!("{p}.self_attn.o_proj.weight"), h, q)?,
                post_attention_norm: v(format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj: m(format!("{p}.mlp.gate_proj.weight"), i, h)?,
                up_proj: m(format!("{p}.mlp.up_proj.weight"), i, h)?,
                down_proj: m(format!("{p}.mlp.down_proj.weight"), h, i)?,
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(m("lm_head.weight".into(), cfg.vocab_size, h)?)
        };
        Ok(Self {
            embed_tokens: m("model.embed_tokens.weight".into(), cfg.vocab_size, h)?,
            layers,
            norm: v("model.norm.weight".into())?,
            lm_head,
            mode,
        })
    }

    /// The matrix that produces the logits (`lm_head`, or the embedding when tied).
    pub fn output(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Bytes of matrices held in memory.
    pub fn resident_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
                .iter()
                .map(|m| m.resident_bytes())
                .sum::<usize>()
            })
            .sum();
        layers
            + self.embed_tokens.resident_bytes()
            + self.lm_head.as_ref().map_or(0, |m| m.resident_bytes())
    }
}

fn entry<'a>(
    ckpt: &'a Checkpoint,
    name: &str,
    shape: &[usize],
) -> Result<&'a TensorEntry, WeightError> {
    let e = ckpt.entry(name).ok_or_else(|| WeightError::Missing {
        tensor: name.to_string(),
    })?;
    if e.shape != shape {
        return Err(WeightError::Shape {
            tensor: name.to_string(),
            expected: shape.to_vec(),
            actual: e.shape.clone(),
        });
    }
    Ok(e)
}

/// Loads one BF16 matrix `name` of `rows × cols` (checked) in `mode`, verifying its checksum.
pub(crate) fn load_matrix(
    ckpt: &Checkpoint,
    name: String,
    rows: usize,
    cols: usize,
    mode: WeightMode,
) -> Result<Matrix, WeightError> {
    let e = entry(ckpt, &name, &[rows, cols])?;
    if e.dtype != Dtype::BF16 {
        return Err(WeightError::Dtype {
            tensor: name,
            dtype: format!("{:?}", e.dtype),
            expected: "BF16",
        });
    }
    // Decoding verifies the checksum of the original bytes, in both modes.
    let bytes = ckpt.load_entry(e)?;
    let compressed = e
        .meta
        .as_ref()
        .is_some_and(|m| m.encoding == Encoding::ExpRans);
    let data = if mode == WeightMode::OnTheFly && compressed {
        drop(bytes);
        MatrixData::Compressed(CompressedMatrix::from_checkpoint(ckpt, e)?)
    } else {
        MatrixData::Bf16(bytes.into_owned())
    };
    ckpt.release(e);
    Ok(Matrix {
        name,
        rows,
        cols,
        data,
    })
}

/// Loads one norm vector `name` of `len` values (BF16 or F32 in the file) as f32.
pub(crate) fn load_vector(
    ckpt: &Checkpoint,
    name: String,
    len: usize,
) -> Result<Vec<f32>, WeightError> {
    let e = entry(ckpt, &name, &[len])?;
    let bytes = ckpt.load_entry(e)?;
    match e.dtype {
        Dtype::BF16 => Ok(bytes
            .chunks_exact(2)
            .map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect()),
        Dtype::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()),
        d => Err(WeightError::Dtype {
            tensor: name,
            dtype: format!("{d:?}"),
            expected: "BF16 or F32",
        }),
    }
}

/// Widens BF16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}
