//! The token-choosing paths of [`CudaBackend`] beyond the synchronous decode calls: a prompt's
//! first token chosen on the device ([`Backend::prefill_sampled`]), and a step split into its
//! launch and its collection ([`Backend::launch_decode`], [`Backend::collect_step`]; a fused
//! step's launch, in `fused.rs`, leaves its collection here too) so the engine thread works
//! while the device runs the step; and the argmax and sampler kernels' queueing and collection
//! that every choosing path shares. Kept apart from the forward pass (`forward.rs`) so that the
//! two change independently.

use std::time::Instant;

use super::{ids_in_vocab, sample, CudaBackend, GpuResult, StepTiming};
use crate::device::{
    Backend, DecodeChoice, DecodeItem, DecodeOutput, DeviceError, Launched, RowSampling, SeqId,
};

/// A step launched and not collected (a decode step's, or a fused step's): what to wait for and
/// what to apply then.
pub(super) struct InFlight {
    /// Each sequence of the step: its length before the step (what an error truncates it back
    /// to) and after it (set once the ids are back).
    lens: Vec<(SeqId, usize, usize)>,
    /// Ids coming back (fixed at the launch: a sequence freed meanwhile still has its row).
    rows: usize,
    /// What chooses them.
    chooser: Chooser,
    /// When the choosing kernel (or the event of a step with no row wanted) was queued.
    queued: Instant,
    /// The timing to put back once collected: a fused step leaves the last decode step's
    /// [`StepTiming`] as it was; `None` for a decode step, which records its own.
    keep_timing: Option<StepTiming>,
}

/// What chooses the ids of a step in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Chooser {
    /// The argmax kernel.
    Argmax,
    /// The sampler kernel.
    Sampler,
    /// Nothing: no row wanted (a fused step of chunks that do not end their prompts); only the
    /// event after the step is waited for, so that its faults are its own.
    Nothing,
}

impl InFlight {
    /// Drops a freed sequence from the step's bookkeeping, so its collection neither sets nor
    /// truncates the length of a handle that is no longer live.
    pub(super) fn forget(&mut self, seq: SeqId) {
        self.lens.retain(|&(s, _, _)| s != seq);
    }
}

impl CudaBackend {
    /// The backend contract of [`Backend::launch_decode`] and [`Backend::launch_step`]: while
    /// a step is in flight, nothing but its collection runs the model (`what` names the call
    /// refused).
    pub(super) fn refuse_in_flight(&self, what: &str) -> Result<(), DeviceError> {
        if self.in_flight.is_some() {
            return Err(DeviceError::Invalid(format!(
                "{what} while a step is in flight: collect_step first"
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
        let chooser = if packed.is_some() {
            Chooser::Sampler
        } else {
            Chooser::Argmax
        };
        let lens = batch
            .iter()
            .map(|it| (it.seq, it.pos, it.pos + 1))
            .collect();
        self.hold_in_flight(lens, batch.len(), chooser, queued, None);
        Ok(Launched::InFlight)
    }

    /// Leaves a launched step's collection to [`CudaBackend::collect_choosing`]: its sequences
    /// (length before, after), its `rows` ids and what chooses them, queued at `queued`.
    pub(super) fn hold_in_flight(
        &mut self,
        lens: Vec<(SeqId, usize, usize)>,
        rows: usize,
        chooser: Chooser,
        queued: Instant,
        keep_timing: Option<StepTiming>,
    ) {
        self.in_flight = Some(InFlight {
            lens,
            rows,
            chooser,
            queued,
            keep_timing,
        });
    }

    /// [`Backend::collect_step`]: the step's one synchronisation (its ids copied back, which
    /// waits for the step and the choosing kernel; for a step with no row wanted, the event
    /// after it), then the sequences at their new lengths. On an error they are as they were
    /// (the blocks the launch reserved given back, and a fatal fault reported,
    /// [`CudaBackend::on_fault`]). The timing's `argmax_ms` / `sample_ms` run from the choosing
    /// kernel's launch to the ids on the host, so they include the host work done meanwhile; a
    /// fused step's collection puts the last decode step's timing back.
    pub(super) fn collect_choosing(&mut self) -> Result<DecodeOutput, DeviceError> {
        let Some(f) = self.in_flight.take() else {
            return Err(DeviceError::Invalid(
                "collect_step: no step is in flight".into(),
            ));
        };
        let r = match f.chooser {
            Chooser::Sampler => self.finish_sample(f.rows, f.queued),
            Chooser::Argmax => self.finish_argmax(f.rows, f.queued),
            Chooser::Nothing => self
                .ctx
                .bind()
                .and_then(|()| self.host_ids.wait(0))
                .map(|_| Vec::new()),
        };
        if let Some(t) = f.keep_timing {
            self.timing = t;
        }
        if r.is_err() {
            // The step's reservations given back: each sequence as it was before the launch.
            for &(seq, from, _) in &f.lens {
                self.kv.truncate(seq, from);
            }
        }
        let ids = self.on_fault(r.map_err(DeviceError::from))?;
        for (seq, _, to) in f.lens {
            self.kv.set_len(seq, to);
        }
        Ok(DecodeOutput::Ids(ids))
    }
}

impl CudaBackend {
    /// The greedy ids of the last decode step's rows, chosen on the device from the logits that
    /// step left in device memory (the logits `decode` returned, bit for bit): the path of
    /// [`Backend::decode_argmax`], run after a [`Backend::decode`]. For the benchmark, which
    /// times both ways of getting greedy tokens on the same step ([`super::StepTiming::argmax_ms`])
    /// and checks they agree. An error when no decode step's logits are there (none yet, or a
    /// prefill or a failed step came after).
    pub fn argmax_last_step(&mut self) -> Result<Vec<u32>, DeviceError> {
        // In flight, the ids' download belongs to that step (its collection would miss them).
        self.refuse_in_flight("argmax_last_step")?;
        if self.logit_rows == 0 {
            return Err(DeviceError::Invalid(
                "argmax_last_step: no decode step's logits on the device".into(),
            ));
        }
        Ok(self.device_argmax(self.logit_rows)?)
    }

    /// The tokens of the last decode step's rows chosen by the device sampler as `rows` say,
    /// from the logits that step left in device memory: the path of
    /// [`Backend::decode_sampled`], run after a [`Backend::decode`], for the benchmark (which
    /// checks them against the host sampler on the logits `decode` returned and times it,
    /// [`super::StepTiming::sample_ms`]). The sampler edits the logits in place, so afterwards they are
    /// no longer the step's: a second call (or `argmax_last_step`) is an error until the next
    /// decode step.
    pub fn sample_last_step(&mut self, rows: &[RowSampling]) -> Result<Vec<u32>, DeviceError> {
        self.refuse_in_flight("sample_last_step")?;
        if self.logit_rows == 0 {
            return Err(DeviceError::Invalid(
                "sample_last_step: no decode step's logits on the device".into(),
            ));
        }
        if rows.len() != self.logit_rows {
            return Err(DeviceError::Invalid(format!(
                "sample_last_step: {} sampling rows for the last step's {} rows",
                rows.len(),
                self.logit_rows
            )));
        }
        let packed = sample::pack(rows, self.cfg.vocab_size, self.edit_capacity())?;
        let r = self.device_sample(&packed).map_err(DeviceError::from);
        self.on_fault(r)
    }

    /// Runs the argmax kernel over the first `rows` rows of the logits buffer and copies the
    /// ids back; records its timing.
    pub(super) fn device_argmax(&mut self, rows: usize) -> GpuResult<Vec<u32>> {
        let t = self.queue_argmax(rows)?;
        self.finish_argmax(rows, t)
    }

    /// Queues the argmax kernel over the first `rows` rows of the logits buffer and the ids'
    /// copy back (no wait); returns when it was queued.
    pub(super) fn queue_argmax(&mut self, rows: usize) -> GpuResult<Instant> {
        self.ctx.bind()?;
        let vocab = self.cfg.vocab_size;
        let t = Instant::now();
        self.choice_events.0.record()?;
        self.k
            .argmax_rows(self.bufs.logits.ptr(), rows, vocab, self.bufs.ids.ptr())?;
        self.choice_events.1.record()?;
        self.host_ids.queue(self.bufs.ids.ptr(), rows)?;
        Ok(t)
    }

    /// The ids of a queued argmax (`queue_argmax` at `t`) back on the host; records its timing.
    pub(super) fn finish_argmax(&mut self, rows: usize, t: Instant) -> GpuResult<Vec<u32>> {
        let (ids, host_ms, gpu_ms) = self.finish_choice(rows, t)?;
        (self.timing.argmax_ms, self.timing.argmax_gpu_ms) = (host_ms, gpu_ms);
        ids_in_vocab(ids, self.cfg.vocab_size, "argmax")
    }

    /// The ids of a queued choosing kernel (queued at `t`, its ids' copy with it) back on the
    /// host: the step's one synchronisation, on the copy's event. Returns them with the time
    /// from `t` to the ids on the host and the kernel's device time (`choice_events`), after
    /// settling the step's own time (its events are complete by then: no further wait).
    pub(super) fn finish_choice(
        &mut self,
        rows: usize,
        t: Instant,
    ) -> GpuResult<(Vec<i32>, f64, f64)> {
        self.ctx.bind()?;
        // The step's one synchronisation: the ids' copy done (the step and the kernel too).
        let ids = self.host_ids.wait(rows)?;
        let host_ms = t.elapsed().as_secs_f64() * 1e3;
        self.settle_step_time()?;
        let gpu_ms = self.choice_events.0.elapsed_ms(&self.choice_events.1)? as f64;
        Ok((ids, host_ms, gpu_ms))
    }

    /// Logit edits the device sampler has room for in one step: they are stored in
    /// `logits_raw` (8 bytes each), which the step's last kernel has consumed by then.
    pub(super) fn edit_capacity(&self) -> usize {
        self.bufs.logits_raw.bytes() / std::mem::size_of::<sample::SampleEdit>()
    }

    /// Runs the sampling kernel over the first `packed.rows.len()` rows of the logits buffer
    /// (editing them in place) and copies the ids back; records its timing.
    pub(super) fn device_sample(&mut self, packed: &sample::Packed) -> GpuResult<Vec<u32>> {
        let t = self.queue_sample(packed)?;
        self.finish_sample(packed.rows.len(), t)
    }

    /// Queues the sampling records' upload and the sampling kernel over the first
    /// `packed.rows.len()` rows of the logits buffer (no wait); returns when it was queued.
    pub(super) fn queue_sample(&mut self, packed: &sample::Packed) -> GpuResult<Instant> {
        self.ctx.bind()?;
        let rows = packed.rows.len();
        let vocab = self.cfg.vocab_size;
        // The logits are edited from now on: not the step's logits any more.
        self.logit_rows = 0;
        let t = Instant::now();
        // Stream-ordered after the step, whose last kernel consumed logits_raw.
        self.staging
            .upload(&self.bufs.sample_rows, 0, &packed.rows)?;
        self.staging
            .upload(&self.bufs.logits_raw, 0, &packed.edits)?;
        self.choice_events.0.record()?;
        self.k.sample_rows(
            self.bufs.logits.ptr(),
            rows,
            vocab,
            self.bufs.sample_rows.ptr(),
            self.bufs.logits_raw.ptr(),
            self.bufs.ids.ptr(),
        )?;
        self.choice_events.1.record()?;
        self.host_ids.queue(self.bufs.ids.ptr(), rows)?;
        Ok(t)
    }

    /// The ids of a queued sampler (`queue_sample` at `t`) back on the host; records its
    /// timing.
    pub(super) fn finish_sample(&mut self, rows: usize, t: Instant) -> GpuResult<Vec<u32>> {
        let (ids, host_ms, gpu_ms) = self.finish_choice(rows, t)?;
        (self.timing.sample_ms, self.timing.sample_gpu_ms) = (host_ms, gpu_ms);
        ids_in_vocab(ids, self.cfg.vocab_size, "sampler")
    }
}
