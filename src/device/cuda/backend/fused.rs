//! A fused step of [`CudaBackend`] ([`Backend::step`], [`Backend::step_sampled`]): prompt
//! chunks of several sequences and a decode batch as one forward pass over all their rows, each
//! weight read once for all of them.
//!
//! The rows are laid out chunk after chunk (each chunk's tokens in order), then the decode rows
//! ([`plan_step`]). Every layer's norms, products and RoPE run over all the rows at once; the
//! attention runs per part: the tiled `attention_prefill` over each chunk's rows (one sequence
//! per launch, as a prefill runs it), the per-token `attention` over the decode rows, split along
//! the sequence as the decode step alone would split it. Only the rows whose logits are wanted
//! (the last row of each chunk that wants a token, every decode row) are gathered for the
//! lm_head, so a chunk of 512 tokens costs one row of the vocabulary product, not 512.
//!
//! A step of more rows than the work buffers hold (`cap`: the larger of `max_sequences` and
//! `max_prefill_tokens`) runs as several passes of at most `cap` rows, in order (a chunk cut
//! between two passes attends, in the second, to the keys the first stored); it is still all or
//! nothing: the sequences' lengths change only once the step's output is back.
//!
//! A step that brings back ids ([`Backend::step_sampled`], [`Backend::launch_step`]) is left in
//! flight: every pass and the choosing kernel are queued, the ids' copy goes into pinned memory
//! with an event, and the collection ([`Backend::collect_step`]) waits on that event, the step's
//! one synchronisation; `step_sampled` is that launch and its collection at once. A step that
//! brings back logits ([`Backend::step`]) runs synchronously: only a backend that does not
//! sample on the device is asked for them.

use super::choosing::Chooser;
use super::*;
use crate::device::ChunkItem;

/// A prompt chunk as [`plan_step`] lays it out: its tokens go in at positions `start..` of the
/// KV-cache slot `slot`; `wants`: its last row's logits are wanted.
#[derive(Clone, Copy, Debug)]
pub(super) struct PlanChunk<'a> {
    pub slot: usize,
    pub start: usize,
    pub tokens: &'a [u32],
    pub wants: bool,
}

/// A decode row as [`plan_step`] lays it out: `token` at `pos` of slot `slot`.
#[derive(Clone, Copy, Debug)]
pub(super) struct PlanDecode {
    pub slot: usize,
    pub pos: usize,
    pub token: u32,
}

/// One forward pass of a fused step: its rows' inputs, how its attention runs, and which rows'
/// logits it computes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Pass {
    /// Token id, position and KV-cache slot of each row.
    pub tokens: Vec<i32>,
    /// See [`Pass::tokens`].
    pub pos: Vec<i32>,
    /// See [`Pass::tokens`].
    pub slots: Vec<i32>,
    /// (first row, rows) of each prompt chunk's part of the pass: one sequence each, at
    /// consecutive positions (the tiled prefill attention's contract).
    pub prefill: Vec<(usize, usize)>,
    /// (first row, rows) of the decode rows, after every prefill part.
    pub decode: Option<(usize, usize)>,
    /// The rows whose logits are wanted, ascending: they are the step's output rows
    /// `out0..out0 + wanted.len()`.
    pub wanted: Vec<i32>,
    /// See [`Pass::wanted`].
    pub out0: usize,
}

impl Pass {
    fn rows(&self) -> usize {
        self.tokens.len()
    }

    fn push(&mut self, token: u32, pos: usize, slot: usize) {
        self.tokens.push(token as i32);
        self.pos.push(pos as i32);
        self.slots.push(slot as i32);
    }
}

/// Lays out a fused step's rows in passes of at most `cap` rows (at least 1): the chunks' tokens
/// in order, then the decode rows. A chunk longer than what is left of a pass continues in the
/// next one; so may the decode rows. The output rows (those [`Pass::wanted`] lists) are, in
/// order, the last row of each chunk that wants logits, then every decode row: each pass's are
/// the next ones.
pub(super) fn plan_step(chunks: &[PlanChunk<'_>], decode: &[PlanDecode], cap: usize) -> Vec<Pass> {
    let cap = cap.max(1);
    let mut passes = Vec::new();
    let mut cur = Pass::default();
    let mut out = 0usize;
    // Starts a new pass when the current one is full.
    let room = |cur: &mut Pass, passes: &mut Vec<Pass>, out: usize| {
        if cur.rows() == cap {
            passes.push(std::mem::take(cur));
            cur.out0 = out;
        }
    };
    for c in chunks {
        let mut done = 0;
        while done < c.tokens.len() {
            room(&mut cur, &mut passes, out);
            let take = (c.tokens.len() - done).min(cap - cur.rows());
            let first = cur.rows();
            for (i, &t) in c.tokens[done..done + take].iter().enumerate() {
                cur.push(t, c.start + done + i, c.slot);
            }
            cur.prefill.push((first, take));
            done += take;
            if done == c.tokens.len() && c.wants {
                cur.wanted.push((first + take - 1) as i32);
                out += 1;
            }
        }
    }
    for d in decode {
        room(&mut cur, &mut passes, out);
        let row = cur.rows();
        match &mut cur.decode {
            Some((_, n)) => *n += 1,
            None => cur.decode = Some((row, 1)),
        }
        cur.push(d.token, d.pos, d.slot);
        cur.wanted.push(row as i32);
        out += 1;
    }
    if cur.rows() > 0 {
        passes.push(cur);
    }
    passes
}

/// What a checked fused step changes: each sequence's length before it and after it.
struct Grown {
    lens: Vec<(SeqId, usize, usize)>,
}

impl CudaBackend {
    /// The checks of a fused step, before anything runs ([`crate::device::check_step`], the
    /// CPU backend's too). Returns each sequence's (length, length after the step), chunks
    /// first.
    fn check_step(
        &self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
    ) -> Result<Grown, DeviceError> {
        let lens = crate::device::check_step(
            chunks,
            batch,
            self.cfg.vocab_size,
            self.kv.max_context,
            |seq| self.kv.len(seq),
        )?;
        Ok(Grown { lens })
    }

    /// Reserves the KV blocks of every sequence's new positions, all or nothing: on
    /// [`DeviceError::KvFull`] the ones reserved before are given back and nothing changed.
    fn reserve_step(&mut self, grown: &Grown) -> Result<(), DeviceError> {
        for (i, &(seq, _, to)) in grown.lens.iter().enumerate() {
            if let Err(e) = self.kv.reserve(&mut self.staging, seq, to) {
                self.release_step(&grown.lens[..i]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Gives back what a step reserved: each sequence as it was before it.
    fn release_step(&mut self, lens: &[(SeqId, usize, usize)]) {
        for &(seq, from, _) in lens {
            self.kv.truncate(seq, from);
        }
    }

    /// A checked, reserved fused step's passes queued on the stream (nothing waited for): the
    /// logits of its `wanted` output rows end in rows `0..` of `bufs.logits`, in order.
    fn enqueue_step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        wants: &[bool],
        batch: &[DecodeItem],
        grown: &Grown,
    ) -> GpuResult<()> {
        self.logit_rows = 0;
        self.ctx.bind()?;
        let pc: Vec<PlanChunk<'_>> = chunks
            .iter()
            .zip(wants)
            .zip(&grown.lens)
            .map(|((c, &wants), &(_, start, _))| PlanChunk {
                slot: paged::slot_of(c.seq),
                start,
                tokens: c.tokens,
                wants,
            })
            .collect();
        let pd: Vec<PlanDecode> = batch
            .iter()
            .map(|it| PlanDecode {
                slot: paged::slot_of(it.seq),
                pos: it.pos,
                token: it.token,
            })
            .collect();
        let passes = plan_step(&pc, &pd, self.cap);
        // The decode rows' attention is split along the sequence as the decode step alone
        // would split it (the bucket it would run as), so their attention is that step's.
        let d = batch.len();
        let bucket = if self.opts.graphs {
            pick_bucket(&self.buckets, d).unwrap_or(d)
        } else {
            d
        };
        let splits = decode_splits(
            bucket,
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.sms,
            self.kv.max_context,
        );
        for p in &passes {
            self.upload_inputs(&p.tokens, &p.pos, &p.slots)?;
            if !p.wanted.is_empty() {
                self.staging.upload(&self.bufs.gather, 0, &p.wanted)?;
            }
            let mixed = Attend::Mixed {
                prefill: &p.prefill,
                decode: p.decode,
                splits,
            };
            let want = if p.wanted.is_empty() {
                Want::None
            } else {
                Want::Gathered {
                    rows: p.wanted.len(),
                    out0: p.out0,
                }
            };
            self.enqueue_pass(p.rows(), mixed, want)?;
        }
        Ok(())
    }

    /// The start of every fused step: refused while a step is in flight, the checks, then the
    /// KV blocks of every new position (all or nothing). Returns what the step changes and its
    /// output rows (`wants[i]`: chunk `i` wants a row; every decode row does).
    fn begin_fused(
        &mut self,
        chunks: &[ChunkItem<'_>],
        wants: &[bool],
        batch: &[DecodeItem],
    ) -> Result<(Grown, usize), DeviceError> {
        self.refuse_in_flight("step")?;
        let grown = self.check_step(chunks, batch)?;
        let rows = wants.iter().filter(|&&w| w).count() + batch.len();
        // Every output row is a distinct live sequence, so at most max_sequences: the logits
        // buffers' rows. (A check, not an assumption, since the buffers are sized by it.)
        if rows > self.kv.max_sequences {
            return Err(DeviceError::Invalid(format!(
                "a step of {rows} output rows: the device holds {} (max_sequences)",
                self.kv.max_sequences
            )));
        }
        self.reserve_step(&grown)?;
        Ok((grown, rows))
    }

    /// [`Backend::step`]: the checks, the blocks, the passes, then every chunk's and decode
    /// row's logits copied back (one synchronisation, the copy's), then the sequences' new
    /// lengths; on an error, the sequences as they were (and a fatal fault reported). It runs
    /// synchronously: the engine asks for logits only from a backend that does not sample on
    /// the device, which this one does.
    pub(super) fn fused_logits(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
    ) -> Result<Vec<f32>, DeviceError> {
        let wants = vec![true; chunks.len()];
        let (grown, rows) = self.begin_fused(chunks, &wants, batch)?;
        let r = self
            .enqueue_step(chunks, &wants, batch, &grown)
            .and_then(|()| self.copy_logits(rows));
        self.logit_rows = 0;
        if r.is_err() {
            self.release_step(&grown.lens);
        }
        let out = self.on_fault(r.map_err(DeviceError::from))?;
        for (seq, _, to) in grown.lens {
            self.kv.set_len(seq, to);
        }
        Ok(out)
    }

    /// [`Backend::launch_step`] for ids: the checks, the blocks, every pass (all of them, a
    /// step past `cap` rows included: they are queued in order on the stream, their inputs
    /// going up from pinned staging memory), then the choosing kernel over the wanted rows
    /// (`packed`: the sampler's records; `None`: the argmax kernel) and the ids' copy into
    /// pinned memory with its event, or, with no row wanted, the event alone. Nothing is
    /// waited for (but the staging memory's wrap, which waits for the stream when a step's
    /// inputs overrun it): the step is [`Launched::InFlight`] until
    /// [`CudaBackend::collect_choosing`], which waits on the event, sets the sequences' new
    /// lengths, or on an error gives their blocks back. An error at the launch leaves every
    /// sequence as it was. The timing of the last decode step is left as it was.
    pub(super) fn launch_fused(
        &mut self,
        chunks: &[ChunkItem<'_>],
        wants: &[bool],
        batch: &[DecodeItem],
        packed: Option<&sample::Packed>,
    ) -> Result<Launched, DeviceError> {
        let (grown, rows) = self.begin_fused(chunks, wants, batch)?;
        let timing = self.timing;
        let r = self
            .enqueue_step(chunks, wants, batch, &grown)
            .and_then(|()| match packed {
                // No row wanted (chunks that do not end their prompts): still one
                // synchronisation at the collection, so that the step's faults are its own,
                // before the sequences grow.
                _ if rows == 0 => self
                    .host_ids
                    .queue(self.bufs.ids.ptr(), 0)
                    .map(|()| (Chooser::Nothing, Instant::now())),
                None => self.queue_argmax(rows).map(|t| (Chooser::Argmax, t)),
                Some(p) => self.queue_sample(p).map(|t| (Chooser::Sampler, t)),
            });
        self.logit_rows = 0;
        if r.is_err() {
            self.release_step(&grown.lens);
        }
        let (chooser, queued) = self.on_fault(r.map_err(DeviceError::from))?;
        self.hold_in_flight(grown.lens, rows, chooser, queued, Some(timing));
        Ok(Launched::InFlight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    /// Every row of `passes` in order, as (token, pos, slot).
    fn all_rows(passes: &[Pass]) -> Vec<(i32, i32, i32)> {
        passes
            .iter()
            .flat_map(|p| (0..p.rows()).map(move |r| (p.tokens[r], p.pos[r], p.slots[r])))
            .collect()
    }

    /// The invariants of a plan, whatever the input: passes of 1..=cap rows whose prefill parts
    /// and decode rows tile them in order (one slot and consecutive positions per prefill part,
    /// the decode rows last), and output rows numbered on from pass to pass.
    fn check_invariants(passes: &[Pass], cap: usize) {
        let mut out = 0;
        for p in passes {
            assert!(
                p.rows() >= 1 && p.rows() <= cap,
                "{} rows, cap {cap}",
                p.rows()
            );
            let mut next = 0;
            for &(first, n) in &p.prefill {
                assert_eq!(first, next);
                assert!(n >= 1);
                for r in first..first + n {
                    assert_eq!(p.slots[r], p.slots[first]);
                    assert_eq!(p.pos[r], p.pos[first] + (r - first) as i32);
                }
                next += n;
            }
            if let Some((first, n)) = p.decode {
                assert_eq!(first, next);
                next += n;
            }
            assert_eq!(next, p.rows());
            assert_eq!(p.out0, out);
            assert!(p.wanted.windows(2).all(|w| w[0] < w[1]));
            out += p.wanted.len();
        }
    }

    #[test]
    fn one_pass_lays_out_chunks_then_decode_rows_and_wants_their_last_rows() {
        let (a, b) = (toks(3, 100), toks(2, 200));
        let chunks = [
            PlanChunk {
                slot: 4,
                start: 10,
                tokens: &a,
                wants: true,
            },
            PlanChunk {
                slot: 1,
                start: 0,
                tokens: &b,
                wants: false,
            },
        ];
        let decode = [
            PlanDecode {
                slot: 2,
                pos: 7,
                token: 9,
            },
            PlanDecode {
                slot: 0,
                pos: 30,
                token: 8,
            },
        ];
        let passes = plan_step(&chunks, &decode, 64);
        assert_eq!(passes.len(), 1);
        let p = &passes[0];
        check_invariants(&passes, 64);
        assert_eq!(
            all_rows(&passes),
            vec![
                (100, 10, 4),
                (101, 11, 4),
                (102, 12, 4),
                (200, 0, 1),
                (201, 1, 1),
                (9, 7, 2),
                (8, 30, 0)
            ]
        );
        assert_eq!(p.prefill, vec![(0, 3), (3, 2)]);
        assert_eq!(p.decode, Some((5, 2)));
        // Chunk a's last row (2); chunk b wants none; both decode rows.
        assert_eq!(p.wanted, vec![2, 5, 6]);
    }

    #[test]
    fn a_step_past_the_cap_continues_in_later_passes_in_order() {
        let (a, b) = (toks(7, 100), toks(4, 200));
        let chunks = [
            PlanChunk {
                slot: 3,
                start: 5,
                tokens: &a,
                wants: true,
            },
            PlanChunk {
                slot: 6,
                start: 0,
                tokens: &b,
                wants: true,
            },
        ];
        let decode: Vec<PlanDecode> = (0..5)
            .map(|i| PlanDecode {
                slot: 10 + i,
                pos: 20 + i,
                token: 50 + i as u32,
            })
            .collect();
        for cap in 1..=20 {
            let passes = plan_step(&chunks, &decode, cap);
            check_invariants(&passes, cap);
            assert_eq!(passes.len(), 16usize.div_ceil(cap), "cap {cap}");
            // The rows are the one-pass layout, cut.
            assert_eq!(
                all_rows(&passes),
                all_rows(&plan_step(&chunks, &decode, 100))
            );
            // Output rows: a's last token, b's last token, then every decode row, in order.
            let wanted: Vec<(i32, i32)> = passes
                .iter()
                .flat_map(|p| {
                    p.wanted
                        .iter()
                        .map(move |&r| (p.tokens[r as usize], p.pos[r as usize]))
                })
                .collect();
            let mut want = vec![(106, 11), (203, 3)];
            want.extend((0..5).map(|i| (50 + i, 20 + i)));
            assert_eq!(wanted, want, "cap {cap}");
        }
        // Cap 4: a in 4 + 3 rows, b in 1 + 3, the decode rows 1 + 4.
        let passes = plan_step(&chunks, &decode, 4);
        assert_eq!(passes[0].prefill, vec![(0, 4)]);
        assert_eq!(passes[1].prefill, vec![(0, 3), (3, 1)]);
        assert_eq!(passes[2].prefill, vec![(0, 3)]);
        assert_eq!(passes[2].decode, Some((3, 1)));
        assert_eq!(passes[3].decode, Some((0, 4)));
        assert_eq!(
            passes.iter().map(|p| p.out0).collect::<Vec<_>>(),
            vec![0, 0, 1, 3]
        );
        assert!(passes[0].wanted.is_empty());
    }

    #[test]
    fn decode_only_and_empty_steps() {
        let decode = [PlanDecode {
            slot: 0,
            pos: 0,
            token: 1,
        }];
        let passes = plan_step(&[], &decode, 8);
        assert_eq!(passes.len(), 1);
        assert_eq!(passes[0].decode, Some((0, 1)));
        assert_eq!(passes[0].wanted, vec![0]);
        assert!(plan_step(&[], &[], 8).is_empty());
        // A zero cap is taken as 1, never a pass of no rows.
        let t = toks(3, 0);
        let c = [PlanChunk {
            slot: 0,
            start: 0,
            tokens: &t,
            wants: true,
        }];
        let passes = plan_step(&c, &[], 0);
        check_invariants(&passes, 1);
        assert_eq!(passes.len(), 3);
    }
}
