//! The token-choosing paths of [`CudaBackend`] that are not the decode step's own: a prompt's
//! first token chosen on the device ([`Backend::prefill_sampled`]). Kept apart from the forward
//! pass (`backend.rs`) so that the two change independently.

use super::{sample, CudaBackend};
use crate::device::{Backend, DeviceError, RowSampling, SeqId};

impl CudaBackend {
    /// The checks of a prefill, before anything runs: a non-empty prompt of tokens inside the
    /// vocabulary that fits the sequence's context. Returns the sequence's length.
    pub(super) fn check_prefill(&self, seq: SeqId, tokens: &[u32]) -> Result<usize, DeviceError> {
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
        let len = self.check_prefill(seq, tokens)?;
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
        let timing = self.timing;
        let r = self
            .prefill_enqueue(seq, len, tokens)
            .and_then(|()| match &packed {
                None => self.device_argmax(1),
                Some(p) => self.device_sample(p),
            });
        self.timing = timing;
        self.logit_rows = 0;
        let ids = self.on_fault(r.map_err(DeviceError::from))?;
        let id = *ids.first().ok_or_else(|| {
            DeviceError::cuda("prefill_sampled: the device returned no id".into())
        })?;
        self.kv.set_len(seq, len + tokens.len());
        Ok(id)
    }
}
