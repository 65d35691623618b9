//! Where the model runs: the [`Backend`] trait the engine drives, and its implementations
//! ([`cpu::CpuBackend`], the reference; [`cuda::CudaBackend`], the GPU), and [`load_backend`],
//! which picks one and falls back to the CPU, saying why, when no usable GPU is found.
//!
//! The trait works at the granularity of whole model steps (prefill one prompt, decode one token
//! for each of a batch of sequences), not of single operations, so that a GPU backend can capture
//! a whole step as one graph and keep its KV cache and weights where they live. Sequences are
//! opaque slot handles ([`SeqId`]) owned by the backend's KV-cache manager; the engine holds
//! handles, never tensors.
//!
//! Invariants every backend keeps: a sequence's positions are consecutive from 0 (a decode item
//! must give the sequence's current length as its position); logits for a sequence depend only
//! on its own tokens, never on what else is in the batch; a failed step leaves every sequence as
//! it was before the step.

pub mod blocks;
pub mod cpu;
pub mod cuda;
pub mod sampling;
pub mod shared;

pub use blocks::KvUsage;
pub use sampling::{LogitEdit, RowSampling};

use crate::model::weights::WeightError;
use crate::model::LlamaConfig;

/// A KV-cache slot handed out by [`Backend::new_sequence`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u32);

/// One sequence's part in a batched decode step: feed `token` at position `pos`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeItem {
    /// The sequence.
    pub seq: SeqId,
    /// The token to append.
    pub token: u32,
    /// Its position: must equal the number of tokens the sequence holds so far.
    pub pos: usize,
}

/// One sequence's prompt chunk in a fused step ([`Backend::step`]): `tokens` go in at the
/// sequence's next positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkItem<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// Its next prompt tokens (at least one).
    pub tokens: &'a [u32],
}

/// [`Backend::step_sampled`]'s first check, every backend's: one (optional) sampling record per
/// chunk and one per decode row.
pub(crate) fn check_sampling_rows(
    chunks: usize,
    chunk_rows: usize,
    batch: usize,
    rows: usize,
) -> Result<(), DeviceError> {
    if chunk_rows != chunks || rows != batch {
        return Err(DeviceError::Invalid(format!(
            "step_sampled: {chunk_rows} chunk rows for {chunks} chunks and {rows} sampling rows \
             for a batch of {batch}"
        )));
    }
    Ok(())
}

/// The checks every backend makes on a fused step ([`Backend::step`]) before anything runs, so
/// that a bad step changes nothing and every backend refuses it with the same error: every chunk
/// non-empty, every sequence live (`len_of` knows it) and in the step once, decode rows at their
/// sequence's length, room for the new positions within `max_context`, every token below
/// `vocab`. Returns each sequence's (length before the step, length after it), chunks first,
/// then the decode rows, in order.
pub(crate) fn check_step(
    chunks: &[ChunkItem<'_>],
    batch: &[DecodeItem],
    vocab: usize,
    max_context: usize,
    len_of: impl Fn(SeqId) -> Result<usize, DeviceError>,
) -> Result<Vec<(SeqId, usize, usize)>, DeviceError> {
    let mut seen = std::collections::HashSet::new();
    let mut lens = Vec::with_capacity(chunks.len() + batch.len());
    let rows = chunks.iter().map(|c| (c.seq, c.tokens, None)).chain(
        batch
            .iter()
            .map(|it| (it.seq, std::slice::from_ref(&it.token), Some(it.pos))),
    );
    for (seq, tokens, pos) in rows {
        if tokens.is_empty() {
            return Err(DeviceError::Invalid(
                "prefill of an empty token list".into(),
            ));
        }
        let len = len_of(seq)?;
        if !seen.insert(seq) {
            return Err(DeviceError::Invalid(format!(
                "sequence {seq:?} appears twice in one step"
            )));
        }
        if let Some(pos) = pos.filter(|&p| p != len) {
            return Err(DeviceError::BadPosition { seq, len, pos });
        }
        let want = len + tokens.len();
        if want > max_context {
            return Err(DeviceError::ContextFull {
                seq,
                want,
                max: max_context,
            });
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(DeviceError::BadToken { token, vocab });
        }
        lens.push((seq, len, want));
    }
    Ok(lens)
}

/// Logits of a step: one row of `vocab` f32 values per sequence, in request order.
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    /// Values per row.
    pub vocab: usize,
    /// `rows × vocab` values, row-major.
    pub data: Vec<f32>,
}

impl Logits {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// The greedy token of a row of logits: the lowest id among equal maxima; NaN never wins; 0 when
/// no value is above -inf (all NaN, all -inf, or an empty row).
///
/// It lives here, not in the engine's sampler (which re-exports it as
/// `engine::sampler::argmax`), because it is part of the backend contract: the default
/// [`Backend::decode_argmax`] applies it to the logits, and a device's own argmax (the CUDA
/// kernel `argmax_rows`) must give the same id for every row, so that the engine's token
/// streams do not depend on which of the two paths a step took.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// What a decode step launched with [`Backend::launch_decode`] is to bring back.
#[derive(Clone, Copy, Debug)]
pub enum DecodeChoice<'a> {
    /// Each row's greedy id, as [`Backend::decode_argmax`].
    Argmax,
    /// Each row's id chosen as its record says, as [`Backend::decode_sampled`] (only on a
    /// backend that [`samples_on_device`](Backend::samples_on_device)).
    Sampled(&'a [RowSampling]),
    /// Every row's logits, as [`Backend::decode`].
    Logits,
}

/// What a fused step launched with [`Backend::launch_step`] is to bring back.
#[derive(Clone, Copy, Debug)]
pub enum StepChoice<'a> {
    /// The ids [`Backend::step_sampled`] gives for these records: `chunks[i]` for chunk `i`
    /// (`None`: no token wanted), `rows[j]` for decode item `j` (only on a backend that
    /// [`samples_on_device`](Backend::samples_on_device)).
    Sampled {
        /// One per chunk.
        chunks: &'a [Option<RowSampling>],
        /// One per decode item.
        rows: &'a [RowSampling],
    },
    /// The logits [`Backend::step`] gives: one row per chunk, then one per decode item.
    Logits,
}

/// What a step brought back: ids (one per row chosen) or logits.
#[derive(Clone, Debug, PartialEq)]
pub enum DecodeOutput {
    /// One id per row, in order.
    Ids(Vec<u32>),
    /// One row of logits per item, in order.
    Logits(Logits),
}

/// Where a step stands after [`Backend::launch_decode`] or [`Backend::launch_step`].
#[derive(Clone, Debug, PartialEq)]
pub enum Launched {
    /// It ran to completion inside the launch (the default: a backend whose every call is
    /// synchronous, the CPU); there is nothing to collect.
    Done(DecodeOutput),
    /// It runs on the device; [`Backend::collect_step`] waits for it and brings its output.
    InFlight,
}

/// How much the KV cache can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCapacity {
    /// Sequences that can be live at once.
    pub max_sequences: usize,
    /// Tokens (prompt and generated) one sequence can hold.
    pub max_context: usize,
}

/// Bytes of a backend's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightMemory {
    /// Where the backend keeps them (host memory on the CPU, device memory on the GPU).
    pub bytes: u64,
    /// The same weights as BF16.
    pub bf16_bytes: u64,
}

/// What can go wrong running the model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The model's config.json is unusable.
    #[error(transparent)]
    Config(#[from] crate::model::config::ConfigError),
    /// Loading or decoding weights failed.
    #[error(transparent)]
    Weights(#[from] WeightError),
    /// Every KV-cache slot is taken.
    #[error("KV cache is full: all {0} sequence slots are in use")]
    NoFreeSlot(usize),
    /// The KV cache has too few free blocks for what a step would append; nothing changed.
    #[error("KV cache is full: sequence {seq:?} needs {need} more blocks, {free} are free")]
    KvFull {
        /// The sequence.
        seq: SeqId,
        /// Blocks it needs.
        need: usize,
        /// Blocks free.
        free: usize,
    },
    /// A handle that is not (or no longer) a live sequence.
    #[error("sequence {0:?} does not exist")]
    UnknownSequence(SeqId),
    /// A sequence would outgrow its context.
    #[error("sequence {seq:?} would hold {want} tokens, more than the context of {max}")]
    ContextFull {
        /// The sequence.
        seq: SeqId,
        /// Tokens it would hold.
        want: usize,
        /// The limit.
        max: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    BadToken {
        /// The id.
        token: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A decode item whose position is not the sequence's length.
    #[error("sequence {seq:?} holds {len} tokens, so its next position is {len}, not {pos}")]
    BadPosition {
        /// The sequence.
        seq: SeqId,
        /// Tokens it holds.
        len: usize,
        /// The position asked for.
        pos: usize,
    },
    /// A malformed request to the backend (empty prompt, a sequence twice in one batch).
    #[error("{0}")]
    Invalid(String),
    /// A CUDA driver or cuBLAS call failed, or the device cannot hold what was asked; its
    /// [`FaultKind`] says whether the context survives.
    #[error("CUDA: {0}")]
    Cuda(cuda::driver::GpuError),
}

/// What a device error means for the instance that got it, so that a server can tell a bad
/// request from a dead device and never keep stepping a context that can only fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The device context is unusable from now on (a sticky CUDA error: an illegal address, a
    /// failed launch, an uncorrectable ECC error, ...): every later call in it fails. Whatever
    /// the backend holds is lost; the instance must be rebuilt in a new context or reported
    /// unhealthy.
    Fatal,
    /// Out of a resource (device memory, launch resources, KV-cache slots) for this call; the
    /// backend is fine and later or smaller work may succeed.
    Resource,
    /// This call was wrong or refused (bad input, a limit, a malformed request); only it failed.
    Invalid,
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FaultKind::Fatal => "fatal",
            FaultKind::Resource => "out of resources",
            FaultKind::Invalid => "invalid",
        })
    }
}

impl DeviceError {
    /// What this error means for the backend that returned it (see [`FaultKind`]): only a CUDA
    /// fault can be fatal; a full KV cache or context is a resource limit; the rest are the
    /// call's own.
    pub fn kind(&self) -> FaultKind {
        match self {
            DeviceError::Cuda(e) => e.kind,
            DeviceError::NoFreeSlot(_) | DeviceError::ContextFull { .. } => FaultKind::Resource,
            _ => FaultKind::Invalid,
        }
    }

    /// A CUDA error from our own checks (a size, a limit, a missing kernel): the context is
    /// fine ([`FaultKind::Invalid`]).
    pub fn cuda(message: String) -> Self {
        DeviceError::Cuda(cuda::driver::GpuError::invalid(message))
    }
}

/// A device that runs a Llama model step by step over KV-cached sequences.
pub trait Backend: Send {
    /// The model's configuration.
    fn config(&self) -> &LlamaConfig;

    /// What the KV cache can hold.
    fn kv_capacity(&self) -> KvCapacity;

    /// How much of the KV cache is in use, in blocks and tokens. The engine admits a request
    /// only when blocks for its prompt are free, and metrics read it. A backend without paging
    /// reports one block per sequence slot (`block_tokens` = its context).
    fn kv_usage(&self) -> KvUsage;

    /// What the weights take where this backend keeps them, next to what the same weights
    /// take as BF16: what compression saves, for the load log and metrics.
    fn weight_memory(&self) -> WeightMemory;

    /// Takes a free KV-cache slot for a new, empty sequence.
    fn new_sequence(&mut self) -> Result<SeqId, DeviceError>;

    /// Releases a sequence's slot (unknown handles are ignored).
    fn free_sequence(&mut self, seq: SeqId);

    /// Tokens the sequence holds.
    fn sequence_len(&self, seq: SeqId) -> Result<usize, DeviceError>;

    /// Appends `tokens` to the sequence (a whole prompt, or a continuation of one), running them
    /// through the model together, and returns the logits after the last of them.
    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>, DeviceError>;

    /// Appends one token to each of several distinct sequences in one step and returns one row of
    /// logits per item, in order.
    fn decode(&mut self, batch: &[DecodeItem]) -> Result<Logits, DeviceError>;

    /// [`Backend::decode`] for a batch whose every row only needs its greedy token: returns
    /// [`argmax`] of each row's logits, in order, with the same validation, the same effect on
    /// the sequences and the same errors as `decode`.
    ///
    /// Why: a row whose choice is the plain argmax (greedy, nothing masked) needs 4 bytes, not
    /// `vocab` f32 (Llama 3: 0.5 MB per row). A device
    /// backend overrides this to choose on the device and copy only the ids; the default (the
    /// CPU's) runs `decode` and [`argmax`] on the host, which is the same function the device
    /// must match, so the engine's tokens are bit-identical either way.
    fn decode_argmax(&mut self, batch: &[DecodeItem]) -> Result<Vec<u32>, DeviceError> {
        let logits = self.decode(batch)?;
        Ok((0..batch.len()).map(|i| argmax(logits.row(i))).collect())
    }

    /// Whether [`Backend::decode_sampled`] chooses tokens where the logits are. The engine then
    /// hands it the rows that need more than the plain argmax (sampling, penalties, masks)
    /// instead of asking [`Backend::decode`] for their logits. `false` by default (the CPU: its
    /// logits already are where the engine's sampler runs).
    fn samples_on_device(&self) -> bool {
        false
    }

    /// [`Backend::decode`], then each row's token chosen as `rows[i]` says (docs/sampling.md,
    /// the same token `engine::sampler::choose` gives for the row's logits), with the same
    /// validation, the same effect on the sequences and the same errors as `decode`. Only the
    /// ids come back.
    ///
    /// Why: a device backend keeps the logits (Llama 3: 0.5 MB per row) on the device and the
    /// host never scans them. Only a backend whose [`samples_on_device`](Backend::samples_on_device)
    /// is true implements it; the default refuses before running anything, naming the backend
    /// contract (the engine never calls it then).
    fn decode_sampled(
        &mut self,
        batch: &[DecodeItem],
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, DeviceError> {
        let _ = (batch, rows);
        Err(DeviceError::Invalid(
            "decode_sampled: this backend does not choose tokens itself (samples_on_device is \
             false); ask decode for the logits"
                .into(),
        ))
    }

    /// [`Backend::prefill`], then the token after the prompt chosen as `row` says (the same
    /// token `engine::sampler::choose` gives for the prefill's logits, docs/sampling.md), with
    /// the same validation, the same effect on the sequence and the same errors as `prefill`.
    /// Only the id comes back.
    ///
    /// Why: a prompt's first token is chosen where its logits are, as every later token is
    /// ([`Backend::decode_sampled`]), so a device backend never copies a row of logits back for
    /// it. Only a backend whose [`samples_on_device`](Backend::samples_on_device) is true
    /// implements it; the default refuses before running anything (the engine never calls it
    /// then: it asks `prefill` for the logits and chooses on the host, which is where those
    /// logits are). A backend may take a cheaper path for a row that [`RowSampling::is_greedy`]
    /// without edits (the device argmax): [`argmax`] is the same token.
    fn prefill_sampled(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        row: &RowSampling,
    ) -> Result<u32, DeviceError> {
        let _ = (seq, tokens, row);
        Err(DeviceError::Invalid(
            "prefill_sampled: this backend does not choose tokens itself (samples_on_device is \
             false); ask prefill for the logits"
                .into(),
        ))
    }

    /// [`Backend::step`] with each row's token chosen where the logits are: `chunk_rows[i]` says
    /// how chunk `i`'s token is chosen, `None` for a chunk that does not end its prompt (no
    /// token wanted), and `rows[j]` how decode item `j`'s is. Returns one id per `Some` chunk
    /// row, in order, then one per decode item: the tokens `engine::sampler::choose` gives for
    /// the rows `step` would return.
    ///
    /// Why: a backend that [`fuses_steps`](Backend::fuses_steps) and
    /// [`samples_on_device`](Backend::samples_on_device) brings back ids, never logits, for a
    /// step that mixes prompt chunks and decode rows. The default refuses unless the backend
    /// samples on the device; then it runs the parts one after the other through
    /// [`Backend::prefill_sampled`], [`Backend::prefill`] (a chunk with no token wanted; its
    /// logits are dropped) and [`Backend::decode_sampled`], so (as `step`'s default) a failure
    /// part way leaves the chunks before it applied.
    fn step_sampled(
        &mut self,
        chunks: &[ChunkItem<'_>],
        chunk_rows: &[Option<RowSampling>],
        batch: &[DecodeItem],
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, DeviceError> {
        if !self.samples_on_device() {
            return Err(DeviceError::Invalid(
                "step_sampled: this backend does not choose tokens itself (samples_on_device \
                 is false); ask step for the logits"
                    .into(),
            ));
        }
        check_sampling_rows(chunks.len(), chunk_rows.len(), batch.len(), rows.len())?;
        let mut ids = Vec::with_capacity(chunks.len() + batch.len());
        for (c, row) in chunks.iter().zip(chunk_rows) {
            match row {
                Some(row) => ids.push(self.prefill_sampled(c.seq, c.tokens, row)?),
                None => {
                    self.prefill(c.seq, c.tokens)?;
                }
            }
        }
        if !batch.is_empty() {
            ids.extend(self.decode_sampled(batch, rows)?);
        }
        Ok(ids)
    }

    /// Starts a decode step of `batch` that brings back what `choice` says, without waiting for
    /// it where the backend can: [`Launched::InFlight`] means the step runs on the device while
    /// the caller does host work, and its output (with any error the step meets) comes from
    /// [`Backend::collect_step`]. Validation errors come from the launch, before anything
    /// runs. The same effect on the sequences and the same tokens as the synchronous call
    /// `choice` names.
    ///
    /// Contract while a step is in flight (this one or [`Backend::launch_step`]'s): the next
    /// call that runs the model or touches a sequence (`prefill*`, `decode*`, `step*`,
    /// `launch_*`, `new_sequence`, `free_sequence`, `sequence_len`) must be `collect_step`;
    /// only the read-only queries (`config`, `kv_capacity`, `kv_usage`, `weight_memory`,
    /// `samples_on_device`, `fuses_steps`, `context_lost`) may come in between, and they see
    /// the sequences as they were before the step (`kv_usage` may count the blocks the step
    /// reserved).
    ///
    /// Why: the engine thread prepares the next step's host work (responses, admission,
    /// cancellations, metrics) while the device runs this one. The default runs the whole step
    /// here ([`Launched::Done`]): a backend whose every call is synchronous changes nothing.
    fn launch_decode(
        &mut self,
        batch: &[DecodeItem],
        choice: DecodeChoice<'_>,
    ) -> Result<Launched, DeviceError> {
        Ok(Launched::Done(match choice {
            DecodeChoice::Argmax => DecodeOutput::Ids(self.decode_argmax(batch)?),
            DecodeChoice::Sampled(rows) => DecodeOutput::Ids(self.decode_sampled(batch, rows)?),
            DecodeChoice::Logits => DecodeOutput::Logits(self.decode(batch)?),
        }))
    }

    /// [`Backend::launch_decode`] for a fused step ([`Backend::step`]: prompt chunks and decode
    /// rows): starts it, bringing back what `choice` says ([`Backend::step_sampled`]'s ids or
    /// `step`'s logits), without waiting for it where the backend can; its output, or the
    /// error it meets, comes from [`Backend::collect_step`]. The same contract while it is in
    /// flight as `launch_decode`'s, and the same effect on the sequences and the same output as
    /// the synchronous call `choice` names (all or nothing on a backend that
    /// [`fuses_steps`](Backend::fuses_steps): on an error, at the launch or the collection,
    /// every sequence is as it was before the step).
    ///
    /// Why: a step that admits a prompt is as long as a decode step or longer; the engine's
    /// host work overlaps it as it overlaps a decode step. The default runs the synchronous
    /// call here ([`Launched::Done`]).
    fn launch_step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
        choice: StepChoice<'_>,
    ) -> Result<Launched, DeviceError> {
        Ok(Launched::Done(match choice {
            StepChoice::Sampled {
                chunks: chunk_rows,
                rows,
            } => DecodeOutput::Ids(self.step_sampled(chunks, chunk_rows, batch, rows)?),
            StepChoice::Logits => DecodeOutput::Logits(self.step(chunks, batch)?),
        }))
    }

    /// Waits for the step [`Backend::launch_decode`] or [`Backend::launch_step`] left in
    /// flight and returns its output; the sequences hold the step's tokens then. On an error
    /// they are as they were before the step. The default (no step is ever left in flight)
    /// refuses.
    fn collect_step(&mut self) -> Result<DecodeOutput, DeviceError> {
        Err(DeviceError::Invalid(
            "collect_step: no step is in flight".into(),
        ))
    }

    /// A fatal error when the device context this backend runs in died since it was built,
    /// whoever faulted: every instance on a GPU shares the device's context, so one instance's
    /// sticky fault kills it for all, and a new context can only be made once every holder has
    /// let go. The serving layer asks before each step and while idle, and replaces the engine
    /// on `Some` without stepping it again. `None` by default (nothing shared: the CPU).
    fn context_lost(&self) -> Option<DeviceError> {
        None
    }

    /// Whether [`Backend::step`] runs prompt chunks and decode rows through the model in one
    /// pass. The engine then schedules a step that has prompt chunks as one step (one weight
    /// read for every row, so a prompt being admitted costs the running streams its chunk's
    /// compute, not a step of its own); otherwise it keeps separate [`Backend::prefill`] and
    /// [`Backend::decode_argmax`] calls. A step without chunks is a plain
    /// [`Backend::launch_decode`] either way (a device keeps its graph and its overlap).
    fn fuses_steps(&self) -> bool {
        false
    }

    /// Prompt chunks of distinct sequences and a decode batch (of other sequences) as one step:
    /// returns one row of logits per chunk (after its last token), then one per decode item, in
    /// order. A row's logits are those [`Backend::prefill`] or [`Backend::decode`] would give it
    /// alone. The default runs the parts one after the other (so a failure part way leaves the
    /// chunks before it applied); a backend that [`fuses_steps`](Backend::fuses_steps) runs
    /// them in one pass, all or nothing.
    fn step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
    ) -> Result<Logits, DeviceError> {
        let vocab = self.config().vocab_size;
        let mut data = Vec::with_capacity((chunks.len() + batch.len()) * vocab);
        for c in chunks {
            data.extend(self.prefill(c.seq, c.tokens)?);
        }
        if !batch.is_empty() {
            data.extend(self.decode(batch)?.data);
        }
        Ok(Logits { vocab, data })
    }
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn config(&self) -> &LlamaConfig {
        (**self).config()
    }
    fn kv_capacity(&self) -> KvCapacity {
        (**self).kv_capacity()
    }
    fn kv_usage(&self) -> KvUsage {
        (**self).kv_usage()
    }
    fn weight_memory(&self) -> WeightMemory {
        (**self).weight_memory()
    }
    fn new_sequence(&mut self) -> Result<SeqId, DeviceError> {
        (**self).new_sequence()
    }
    fn free_sequence(&mut self, seq: SeqId) {
        (**self).free_sequence(seq)
    }
    fn sequence_len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        (**self).sequence_len(seq)
    }
    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>, DeviceError> {
        (**self).prefill(seq, tokens)
    }
    fn decode(&mut self, batch: &[DecodeItem]) -> Result<Logits, DeviceError> {
        (**self).decode(batch)
    }
    fn decode_argmax(&mut self, batch: &[DecodeItem]) -> Result<Vec<u32>, DeviceError> {
        (**self).decode_argmax(batch)
    }
    fn samples_on_device(&self) -> bool {
        (**self).samples_on_device()
    }
    fn decode_sampled(
        &mut self,
        batch: &[DecodeItem],
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, DeviceError> {
        (**self).decode_sampled(batch, rows)
    }
    fn prefill_sampled(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        row: &RowSampling,
    ) -> Result<u32, DeviceError> {
        (**self).prefill_sampled(seq, tokens, row)
    }
    fn step_sampled(
        &mut self,
        chunks: &[ChunkItem<'_>],
        chunk_rows: &[Option<RowSampling>],
        batch: &[DecodeItem],
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, DeviceError> {
        (**self).step_sampled(chunks, chunk_rows, batch, rows)
    }
    fn launch_decode(
        &mut self,
        batch: &[DecodeItem],
        choice: DecodeChoice<'_>,
    ) -> Result<Launched, DeviceError> {
        (**self).launch_decode(batch, choice)
    }
    fn launch_step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
        choice: StepChoice<'_>,
    ) -> Result<Launched, DeviceError> {
        (**self).launch_step(chunks, batch, choice)
    }
    fn collect_step(&mut self) -> Result<DecodeOutput, DeviceError> {
        (**self).collect_step()
    }
    fn context_lost(&self) -> Option<DeviceError> {
        (**self).context_lost()
    }
    fn fuses_steps(&self) -> bool {
        (**self).fuses_steps()
    }
    fn step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
    ) -> Result<Logits, DeviceError> {
        (**self).step(chunks, batch)
    }
}

/// Which device [`load_backend`] should use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// The CPU reference backend.
    Cpu,
    /// The CUDA backend; the CPU when no usable GPU is found (the reason is printed).
    Cuda,
}

/// The device a [`load_backend`] call ended on, and why.
#[derive(Clone, Debug)]
pub enum Selected {
    /// The CPU; `fallback` holds why the GPU asked for was not used.
    Cpu {
        /// Why CUDA was not used, when it was asked for.
        fallback: Option<String>,
    },
    /// The GPU described.
    Cuda(cuda::DeviceInfo),
}

/// Loads a checkpoint directory on the device asked for. For [`DeviceKind::Cuda`], `probe` is
/// the result of [`cuda::probe`] (passed in so tests can simulate a machine without a GPU); when
/// it is an error the CPU backend is loaded instead and the reason goes to stderr and the log.
/// The weights are held as `mode` says on the CPU; on the GPU they are streamed from the
/// checkpoint tensor by tensor ([`cuda::CudaBackend::load`]). A CUDA plan of
/// [`cuda::PlanSource::Auto`] without a directory gets `dir` (where its tuning table lives).
pub fn load_backend(
    dir: &std::path::Path,
    kind: DeviceKind,
    probe: Result<cuda::DeviceInfo, String>,
    mode: crate::model::weights::WeightMode,
    cpu_opts: &cpu::CpuOptions,
    cuda_opts: &cuda::CudaOptions,
) -> Result<(Box<dyn Backend>, Selected), DeviceError> {
    use crate::model::weights::{LlamaWeights, WeightError};
    let cfg = LlamaConfig::from_dir(dir)?;
    let mut cuda_opts = cuda_opts.clone();
    if let cuda::PlanSource::Auto { dir: None } = cuda_opts.plan {
        cuda_opts.plan = cuda::PlanSource::Auto {
            dir: Some(dir.to_path_buf()),
        };
    }
    let (b, selected) = match (kind, probe) {
        // Streamed to the device tensor by tensor: no host copy of the model.
        (DeviceKind::Cuda, Ok(info)) => {
            let b: Box<dyn Backend> = Box::new(cuda::CudaBackend::load(dir, &cuda_opts)?);
            (b, Selected::Cuda(info))
        }
        (kind, probe) => {
            let ckpt = crate::container::Checkpoint::open(dir).map_err(WeightError::from)?;
            let weights = LlamaWeights::load(&ckpt, &cfg, mode)?;
            backend_on(cfg, weights.into(), kind, probe, cpu_opts, &cuda_opts)?
        }
    };
    if let Selected::Cpu {
        fallback: Some(reason),
    } = &selected
    {
        eprintln!("unweight: CUDA is not usable ({reason}); running on the CPU");
        tracing::warn!(%reason, "CUDA is not usable; running on the CPU");
    }
    Ok((b, selected))
}

/// A backend over loaded weights on the device asked for: the one place that decides between
/// the GPU and the CPU fallback. For [`DeviceKind::Cuda`], `probe` is [`cuda::probe`]'s (or
/// [`cuda::probe_ordinal`]'s) result; an error means the CPU backend, with the reason in
/// [`Selected::Cpu`] for the caller to report. The GPU needs [`WeightMode::Decoded`] weights.
///
/// [`WeightMode::Decoded`]: crate::model::weights::WeightMode::Decoded
pub fn backend_on(
    cfg: LlamaConfig,
    weights: std::sync::Arc<crate::model::weights::LlamaWeights>,
    kind: DeviceKind,
    probe: Result<cuda::DeviceInfo, String>,
    cpu_opts: &cpu::CpuOptions,
    cuda_opts: &cuda::CudaOptions,
) -> Result<(Box<dyn Backend>, Selected), DeviceError> {
    let fallback = match (kind, probe) {
        (DeviceKind::Cpu, _) => None,
        (DeviceKind::Cuda, Ok(info)) => {
            let b = cuda::CudaBackend::from_weights(cfg, &weights, cuda_opts)?;
            return Ok((Box::new(b), Selected::Cuda(info)));
        }
        (DeviceKind::Cuda, Err(reason)) => Some(reason),
    };
    let b = cpu::CpuBackend::new(cfg, weights, cpu_opts);
    Ok((Box::new(b), Selected::Cpu { fallback }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sequences 0..4 live with lengths 5, 0, 7, 7; vocabulary 100; contexts of 10.
    fn check(
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
    ) -> Result<Vec<(SeqId, usize, usize)>, DeviceError> {
        let lens = [5, 0, 7, 7];
        check_step(chunks, batch, 100, 10, |s| {
            lens.get(s.0 as usize)
                .copied()
                .ok_or(DeviceError::UnknownSequence(s))
        })
    }

    fn chunk(seq: u32, tokens: &[u32]) -> ChunkItem<'_> {
        ChunkItem {
            seq: SeqId(seq),
            tokens,
        }
    }

    fn row(seq: u32, token: u32, pos: usize) -> DecodeItem {
        DecodeItem {
            seq: SeqId(seq),
            token,
            pos,
        }
    }

    #[test]
    fn check_step_gives_each_sequences_lengths_and_refuses_what_does_not_fit() {
        let lens = check(&[chunk(1, &[1, 2, 3]), chunk(0, &[4])], &[row(2, 9, 7)]).unwrap();
        assert_eq!(
            lens,
            vec![(SeqId(1), 0, 3), (SeqId(0), 5, 6), (SeqId(2), 7, 8)]
        );
        assert_eq!(check(&[], &[]).unwrap(), vec![]);

        let invalid = |r: Result<_, DeviceError>, needle: &str| match r {
            Err(DeviceError::Invalid(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("expected Invalid({needle}), got {other:?}"),
        };
        invalid(check(&[chunk(1, &[])], &[]), "empty token list");
        invalid(check(&[chunk(1, &[1])], &[row(1, 1, 0)]), "appears twice");
        invalid(
            check(&[chunk(0, &[1]), chunk(0, &[2])], &[]),
            "appears twice",
        );
        assert!(matches!(
            check(&[], &[row(9, 1, 0)]),
            Err(DeviceError::UnknownSequence(SeqId(9)))
        ));
        assert!(matches!(
            check(&[], &[row(2, 1, 6)]),
            Err(DeviceError::BadPosition {
                seq: SeqId(2),
                len: 7,
                pos: 6
            })
        ));
        // 5 + 6 = 11 positions in a context of 10; 7 + 3 = 10 fits exactly.
        assert!(matches!(
            check(&[chunk(0, &[1; 6])], &[]),
            Err(DeviceError::ContextFull {
                seq: SeqId(0),
                want: 11,
                max: 10
            })
        ));
        assert!(check(&[chunk(3, &[1; 3])], &[]).is_ok());
        assert!(matches!(
            check(&[chunk(1, &[1, 100])], &[]),
            Err(DeviceError::BadToken {
                token: 100,
                vocab: 100
            })
        ));
        assert!(matches!(
            check(&[], &[row(3, 100, 7)]),
            Err(DeviceError::BadToken {
                token: 100,
                vocab: 100
            })
        ));
    }
}
