//! The token-choosing paths of [`CudaBackend`] beyond the synchronous decode calls: a prompt's
//! first token chosen on the device ([`Backend::prefill_sampled`]), and a decode step split
//! into its launch and its collection ([`Backend::launch_decode`], [`Backend::collect_decode`])
//! so the engine thread works while the device runs the step. Kept apart from the forward pass
//! (`backend.rs`) so that the two change independently.

use std::time::Instant;

use super::{sample, CudaBackend};
use crate::device::{
    Backend, DecodeChoice, DecodeItem, DecodeOutput, DeviceError, Launched, RowSampling, SeqId,
};

/// A decode step launched and not collected: what to wait for and what to apply then.
pub(super) struct InFlight {
    /// The batch's sequences and their new lengths, set once the ids are back.
    lens: Vec<(SeqId, usize)>,
    /// Which kernel chooses (true: the sampler), and when it was queued.
    sampled: bool,
    queued: Instant,
}

impl CudaBackend {
    /// The backend contract of [`Backend::launch_decode`]: while a step is in flight, nothing
    /// but its collection runs the model (`what` names the call refused).
    pub(super) fn refuse_in_flight(&self, what: &str) -> Result<(), DeviceError> {
        if self.in_flight.is_some() {
            return Err(DeviceError::Invalid(format!(
                "{what} while a decode step is in flight: collect_decode first"
            )));
        }
        Ok(())
    }

    /// The checks of a prefill, before anything runs: a non-empty prompt of tokens inside the
    /// vocabulary that fits the sequence's context; then the KV blocks for it, all or nothing.
    /// Returns the sequence's length (the caller truncates back to it if the pass fails).
    pub(super) fn check_prefill(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
    ) -> Result<usize, DeviceError> {
        if tokens.is_empty() {
            return Err(DeviceError::Invalid(
                "prefill of an empty token list".into(),
            ));
        }
        let len = self.kv.len(seq)?;
        self.check_room(seq, len + tokens.len())?;
        for &t in tokens {
            self.check_token(t)?;
        }
        // Blocks for the prompt, all or nothing (KvFull changes nothing); the caller gives them
        // back if the pass fails.
        self.kv
            .reserve(&mut self.staging, seq, len + tokens.len())?;
        Ok(len)
    }

    /// [`Backend::prefill_sampled`]: the prefill's passes, then the token of its last row chosen
    /// where the logits are, with one synchronisation (the id's copy back). A greedy row without
    /// edits takes the argmax kernel (the same id: `device::argmax` of the row), any other the
    /// sampler kernel, whose record is packed and checked before anything runs. The timing of
    /// the last decode step ([`CudaBackend::last_timing`]) is left as it was. On an error the
    /// sequence is as it was (and a fatal fault is reported, [`CudaBackend::on_fault`]).
    pub(super) fn prefill_choosing(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        row: &RowSampling,
    ) -> Result<u32, DeviceError> {
        self.refuse_in_flight("prefill_sampled")?;
        let vocab = self.config().vocab_size;
        let packed = if row.is_greedy() && row.edits.is_empty() {
            row.validate().map_err(|e| {
                DeviceError::Invalid(format!("sampling of the prompt's first token: {e}"))
            })?;
            None
        } else {
            Some(sample::pack(
                std::slice::from_ref(row),
                vocab,
                self.edit_capacity(),
            )?)
        };
        let len = self.check_prefill(seq, tokens)?;
        let timing = self.timing;
        let r = self
            .prefill_enqueue(seq, len, tokens)
            .and_then(|()| match &packed {
                None => self.device_argmax(1),
                Some(p) => self.device_sample(p),
            });
        self.timing = timing;
        self.logit_rows = 0;
        if r.is_err() {
            self.kv.truncate(seq, len);
        }
        let ids = self.on_fault(r.map_err(DeviceError::from))?;
        let id = *ids.first().ok_or_else(|| {
            DeviceError::cuda("prefill_sampled: the device returned no id".into())
        })?;
        self.kv.set_len(seq, len + tokens.len());
        Ok(id)
    }

    /// [`Backend::launch_decode`]: for ids (argmax or sampler), the batch checked and its
    /// records packed, then its inputs uploaded from pinned staging memory, its graph (or
    /// kernels) and the choosing kernel queued on the stream, and nothing waited for: the step
    /// is [`Launched::InFlight`] until [`CudaBackend::collect_choosing`]. Logits run the
    /// synchronous `decode` (the benchmark's reference path). A launch while a step is in
    /// flight is refused (the backend contract), as is anything invalid, before anything runs.
    pub(super) fn launch_choosing(
        &mut self,
        batch: &[DecodeItem],
        choice: DecodeChoice<'_>,
    ) -> Result<Launched, DeviceError> {
        self.refuse_in_flight("launch_decode")?;
        let packed = match choice {
            DecodeChoice::Logits => {
                return Ok(Launched::Done(DecodeOutput::Logits(self.decode(batch)?)))
            }
            DecodeChoice::Argmax => None,
            DecodeChoice::Sampled(rows) => {
                if rows.len() != batch.len() {
                    return Err(DeviceError::Invalid(format!(
                        "decode_sampled: {} sampling rows for a batch of {}",
                        rows.len(),
                        batch.len()
                    )));
                }
                Some(rows)
            }
        };
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(Launched::Done(DecodeOutput::Ids(Vec::new())));
        }
        let packed = match packed {
            Some(rows) => Some(sample::pack(
                rows,
                self.config().vocab_size,
                self.edit_capacity(),
            )?),
            None => None,
        };
        self.reserve_batch(batch)?;
        let r = self.run_decode(batch).and_then(|()| match &packed {
            None => self.queue_argmax(batch.len()),
            Some(p) => self.queue_sample(p),
        });
        if r.is_err() {
            self.release_batch(batch);
        }
        let queued = self.on_fault(r.map_err(DeviceError::from))?;
        self.in_flight = Some(InFlight {
            lens: batch.iter().map(|it| (it.seq, it.pos + 1)).collect(),
            sampled: packed.is_some(),
            queued,
        });
        Ok(Launched::InFlight)
    }

    /// [`Backend::collect_decode`]: the step's one synchronisation (its ids copied back, which
    /// waits for the step and the choosing kernel), then the sequences one token longer. On an
    /// error they are as they were (and a fatal fault is reported, [`CudaBackend::on_fault`]).
    /// The timing's `argmax_ms` / `sample_ms` run from the choosing kernel's launch to the ids
    /// on the host, so they include the host work done meanwhile.
    pub(super) fn collect_choosing(&mut self) -> Result<DecodeOutput, DeviceError> {
        let Some(f) = self.in_flight.take() else {
            return Err(DeviceError::Invalid(
                "collect_decode: no decode step is in flight".into(),
            ));
        };
        let rows = f.lens.len();
        let r = if f.sampled {
            self.finish_sample(rows, f.queued)
        } else {
            self.finish_argmax(rows, f.queued)
        };
        if r.is_err() {
            // The step's reservations given back: each sequence as it was before the launch.
            for &(seq, len) in &f.lens {
                self.kv.truncate(seq, len - 1);
            }
        }
        let ids = self.on_fault(r.map_err(DeviceError::from))?;
        for (seq, len) in f.lens {
            self.kv.set_len(seq, len);
        }
        Ok(DecodeOutput::Ids(ids))
    }
}
