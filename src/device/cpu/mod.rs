//! The CPU reference backend: a straightforward f32 Llama forward pass over BF16 weights,
//! multi-threaded with rayon.
//!
//! Embedding, RMSNorm, RoPE (Hugging Face rotate_half, Llama 3 frequency scaling), grouped-query
//! attention over a BF16 KV cache (rounded at store, widened exactly at read, f32 arithmetic),
//! SwiGLU MLP, residuals, final norm and `lm_head` (the embedding when tied). Matrix products run over output rows in parallel (`matmul`) on weights decoded
//! at load or decoded chunk by chunk on the fly ([`WeightMode`]); attention runs flash style
//! over tiles of tokens per key/value head in parallel (`attn`). A step goes through as one
//! `rows × hidden` matrix: a prompt's tokens, one token from each of several decoding sequences
//! at their own positions, or both at once (`Backend::step`).
//!
//! Invariant: a token's logits are a function of its sequence's tokens alone, bit for bit: the
//! batch it shares, the grouping of a prompt into prefill calls and the weight mode never change
//! the arithmetic (see `kernel` and `attn`).

mod attn;
mod embed;
mod kernel;
mod kv;
mod matmul;
mod ops;
mod simd;

use std::path::Path;
use std::sync::Arc;

pub use kernel::KernelKind;
pub use kv::BLOCK_TOKENS as KV_BLOCK_TOKENS;

use self::kv::KvCache;
use super::{
    Backend, ChunkItem, DecodeItem, DeviceError, KvCapacity, KvUsage, Logits, SeqId, WeightMemory,
};
use crate::container::Checkpoint;
use crate::model::weights::{LlamaWeights, WeightError, WeightMode};
use crate::model::LlamaConfig;

/// Settings of a [`CpuBackend`].
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// Sequences live at once.
    pub max_sequences: usize,
    /// Tokens per sequence; `None` for the model's `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Bytes of KV cache (BF16 keys and values, in blocks of [`KV_BLOCK_TOKENS`] positions:
    /// [`CpuBackend::kv_bytes_per_token`] each); `None` for enough blocks to hold
    /// `max_sequences` sequences of `max_context` tokens.
    pub kv_cache_bytes: Option<u64>,
    /// Force a kernel implementation (tests); `None` picks the fastest this CPU runs.
    pub kernel: Option<KernelKind>,
}

impl Default for CpuOptions {
    fn default() -> Self {
        Self {
            max_sequences: 64,
            max_context: None,
            kv_cache_bytes: None,
            kernel: None,
        }
    }
}

/// The CPU backend.
pub struct CpuBackend {
    cfg: LlamaConfig,
    /// Shared: several backends (Triton instances) may serve one loaded model, each with its
    /// own KV cache.
    weights: Arc<LlamaWeights>,
    kv: KvCache,
    kernel: KernelKind,
    inv_freq: Vec<f64>,
}

/// One token going through the model.
#[derive(Clone, Copy)]
struct Item {
    seq: SeqId,
    token: u32,
    pos: usize,
}

impl CpuBackend {
    /// A backend over loaded weights (owned, or shared with other backends).
    pub fn new(cfg: LlamaConfig, weights: impl Into<Arc<LlamaWeights>>, opts: &CpuOptions) -> Self {
        let weights = weights.into();
        let max_context = opts
            .max_context
            .unwrap_or(cfg.max_position_embeddings)
            .min(cfg.max_position_embeddings);
        let max_sequences = opts.max_sequences.max(1);
        let block_bytes = KvCache::block_bytes(cfg.num_hidden_layers, cfg.kv_dim()) as u64;
        let total_blocks = match opts.kv_cache_bytes {
            Some(bytes) => usize::try_from(bytes / block_bytes.max(1)).unwrap_or(usize::MAX),
            None => max_sequences.saturating_mul(max_context.div_ceil(kv::BLOCK_TOKENS)),
        };
        let kv = KvCache::new(
            cfg.num_hidden_layers,
            cfg.kv_dim(),
            total_blocks,
            max_sequences,
            max_context,
        );
        let inv_freq = cfg.rope_inv_freq();
        Self {
            kernel: opts.kernel.unwrap_or_else(KernelKind::detect),
            cfg,
            weights,
            kv,
            inv_freq,
        }
    }

    /// Reads `config.json` and the weights of a checkpoint directory (plain or compressed).
    pub fn load(dir: &Path, mode: WeightMode, opts: &CpuOptions) -> Result<Self, DeviceError> {
        let cfg = LlamaConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir).map_err(WeightError::from)?;
        let weights = LlamaWeights::load(&ckpt, &cfg, mode)?;
        Ok(Self::new(cfg, weights, opts))
    }

    /// The weights.
    pub fn weights(&self) -> &LlamaWeights {
        &self.weights
    }

    /// Bytes of KV cache one token takes on this backend: keys and values of every layer, BF16
    /// (`2 × layers × kv_dim × 2`, as the planner and the CUDA engine count).
    pub fn kv_bytes_per_token(cfg: &LlamaConfig) -> u64 {
        (KvCache::block_bytes(cfg.num_hidden_layers, cfg.kv_dim()) / kv::BLOCK_TOKENS) as u64
    }

    /// The kernel implementation in use.
    pub fn kernel(&self) -> KernelKind {
        self.kernel
    }

    /// Runs `items` through the model, appending their keys and values, and returns the logits
    /// of the items listed in `want`. Blocks for the new positions are reserved first, all or
    /// nothing ([`DeviceError::KvFull`] when they are not free); on any error every touched
    /// sequence is rolled back to its length before the call, its new blocks freed.
    fn forward(&mut self, items: &[Item], want: &[usize]) -> Result<Vec<f32>, DeviceError> {
        // Each sequence's first position in this call (its length before) and its new length.
        let mut spans: Vec<(SeqId, usize, usize)> = Vec::new();
        for it in items {
            match spans.iter_mut().find(|s| s.0 == it.seq) {
                Some(s) => s.2 = s.2.max(it.pos + 1),
                None => spans.push((it.seq, it.pos, it.pos + 1)),
            }
        }
        let mut result = Ok(Vec::new());
        for &(seq, _, end) in &spans {
            if let Err(e) = self.kv.reserve(seq, end) {
                result = Err(e);
                break;
            }
        }
        if result.is_ok() {
            result = self.forward_inner(items, want);
        }
        for &(seq, start, end) in &spans {
            match &result {
                Ok(_) => self.kv.set_len(seq, end)?,
                Err(_) => self.kv.truncate(seq, start),
            }
        }
        result
    }

    fn forward_inner(&mut self, items: &[Item], want: &[usize]) -> Result<Vec<f32>, DeviceError> {
        let c = &self.cfg;
        let (n, h, im) = (items.len(), c.hidden_size, c.intermediate_size);
        let (heads, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (qd, kvd, eps) = (c.q_dim(), c.kv_dim(), c.rms_norm_eps);
        let kind = self.kernel;
        let w = &self.weights;
        let mut x = vec![0f32; n * h];
        let ids: Vec<usize> = items.iter().map(|it| it.token as usize).collect();
        embed::gather(&w.embed_tokens, &ids, &mut x)?;
        let ropes: Vec<(Vec<f32>, Vec<f32>)> = items
            .iter()
            .map(|it| ops::rope_table(&self.inv_freq, it.pos))
            .collect();
        let (mut xn, mut o) = (vec![0f32; n * h], vec![0f32; n * h]);
        let (mut q, mut att) = (vec![0f32; n * qd], vec![0f32; n * qd]);
        let (mut k, mut v) = (vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let (mut gate, mut up) = (vec![0f32; n * im], vec![0f32; n * im]);
        for (l, lw) in w.layers.iter().enumerate() {
            ops::rmsnorm(&x, &lw.input_norm, eps, &mut xn);
            let qkv = vec![
                (&lw.q_proj, &mut q[..]),
                (&lw.k_proj, &mut k[..]),
                (&lw.v_proj, &mut v[..]),
            ];
            matmul::matmuls(kind, qkv, &xn, n)?;
            for (i, (cos, sin)) in ropes.iter().enumerate() {
                ops::rope(&mut q[i * qd..(i + 1) * qd], hd, cos, sin);
                ops::rope(&mut k[i * kvd..(i + 1) * kvd], hd, cos, sin);
            }
            for (i, it) in items.iter().enumerate() {
                let r = i * kvd..(i + 1) * kvd;
                self.kv.write(it.seq, l, it.pos, &k[r.clone()], &v[r])?;
            }
            let queries = items
                .iter()
                .map(|it| self.kv.read(it.seq, l, it.pos + 1))
                .collect::<Result<Vec<_>, DeviceError>>()?;
            let shape = attn::AttnShape {
                heads,
                kv_heads: kvh,
                head_dim: hd,
            };
            attn::attention(kind, &q, &queries, shape, &mut att);
            matmul::matmul(kind, &lw.o_proj, &att, n, &mut o)?;
            ops::add(&mut x, &o);
            ops::rmsnorm(&x, &lw.post_attention_norm, eps, &mut xn);
            let gate_up = vec![(&lw.gate_proj, &mut gate[..]), (&lw.up_proj, &mut up[..])];
            matmul::matmuls(kind, gate_up, &xn, n)?;
            ops::silu_mul(&mut gate, &up);
            matmul::matmul(kind, &lw.down_proj, &gate, n, &mut o)?;
            ops::add(&mut x, &o);
        }
        let m = want.len();
        let mut sel = Vec::with_capacity(m * h);
        for &i in want {
            sel.extend_from_slice(&x[i * h..(i + 1) * h]);
        }
        let mut normed = vec![0f32; m * h];
        ops::rmsnorm(&sel, &w.norm, eps, &mut normed);
        let mut logits = vec![0f32; m * c.vocab_size];
        matmul::matmul(kind, w.output(), &normed, m, &mut logits)?;
        Ok(logits)
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn kv_capacity(&self) -> KvCapacity {
        KvCapacity {
            max_sequences: self.kv.max_sequences(),
            max_context: self.kv.max_context(),
        }
    }

    fn kv_usage(&self) -> KvUsage {
        self.kv.usage()
    }

    fn weight_memory(&self) -> WeightMemory {
        WeightMemory {
            bytes: self.weights.resident_bytes() as u64,
            bf16_bytes: 2 * crate::model::memory::Dims::of_config(&self.cfg).parameters(),
        }
    }

    fn new_sequence(&mut self) -> Result<SeqId, DeviceError> {
        self.kv.alloc()
    }

    fn free_sequence(&mut self, seq: SeqId) {
        self.kv.free(seq)
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.kv.len(seq)
    }

    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>, DeviceError> {
        Ok(self.step(&[ChunkItem { seq, tokens }], &[])?.data)
    }

    fn decode(&mut self, batch: &[DecodeItem]) -> Result<Logits, DeviceError> {
        self.step(&[], batch)
    }

    fn fuses_steps(&self) -> bool {
        true
    }

    /// Every chunk's tokens and every decode row go through the model as one `rows × hidden`
    /// matrix (each weight read once for all of them); attention runs per token over its own
    /// sequence's positions, so every row's bits are those of the row alone.
    fn step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
    ) -> Result<Logits, DeviceError> {
        let vocab = self.cfg.vocab_size;
        let lens = super::check_step(chunks, batch, vocab, self.kv.max_context(), |seq| {
            self.kv.len(seq)
        })?;
        let mut items = Vec::new();
        let mut want = Vec::with_capacity(chunks.len() + batch.len());
        let rows = chunks
            .iter()
            .map(|c| c.tokens)
            .chain(batch.iter().map(|it| std::slice::from_ref(&it.token)));
        for (tokens, &(seq, len, _)) in rows.zip(&lens) {
            items.extend(tokens.iter().enumerate().map(|(i, &token)| Item {
                seq,
                token,
                pos: len + i,
            }));
            want.push(items.len() - 1);
        }
        if items.is_empty() {
            return Ok(Logits {
                vocab,
                data: Vec::new(),
            });
        }
        Ok(Logits {
            vocab,
            data: self.forward(&items, &want)?,
        })
    }
}
