//! The forward pass of a [`CudaBackend`]: one layer after another for a prompt chunk or a
//! decode batch, queued on the stream (`enqueue`), with the step inputs' uploads, the decode
//! graph replays and the logits' copy.

use super::*;

impl CudaBackend {
    /// Queues the product of `n` activation rows with `role`'s matrix `w` by the plan's
    /// strategy; returns the product as the consumer reads it (split rows or not).
    pub(super) fn product(&self, role: Role, w: &Linear, x: Input, y: u64) -> GpuResult<Product> {
        let st = self.plan.strategy(role, &w.shape, x.n);
        let p = Products {
            blas: &self.blas,
            tbe3: &self.t3,
            scratch: &self.bufs.scratch,
            partial: &self.bufs.partial,
            sms: self.sms,
        };
        // SAFETY: (every caller) the input buffers hold `x.bf16_rows` BF16 rows `x.ldb` apart
        // and `x.n` f32 rows of `w`'s columns, within buffers sized for 2 cap (BF16) and cap
        // (f32) rows; `y` holds 2 cap rows of the matrix's rows (logits_raw: 2 max_batch).
        unsafe { p.run(w, st, &x, y)? };
        Ok(Product {
            ptr: y,
            split: st.split_output(self.opts.split_activations),
        })
    }

    /// Queues one pass over `n` tokens whose ids, positions and slots are in the input buffers:
    /// a decode batch (`Want::All`: the per-token attention) or a prompt chunk (the tiled one).
    pub(super) fn enqueue(&self, n: usize, want: Want) -> GpuResult<()> {
        let attend = if want == Want::All {
            Attend::Decode
        } else {
            Attend::Prefill
        };
        self.enqueue_pass(n, attend, want)
    }

    /// Queues one pass over `n` tokens whose ids, positions and slots are in the input buffers
    /// (and, for `Want::Gathered`, the wanted rows in `bufs.gather`), its attention as `attend`
    /// says.
    pub(super) fn enqueue_pass(&self, n: usize, attend: Attend<'_>, want: Want) -> GpuResult<()> {
        let c = &self.cfg;
        let (h, im, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (heads, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (qd, eps) = (c.q_dim(), c.rms_norm_eps as f32);
        let s = self.opts.split_activations;
        let rows = if s { 2 * n } else { n };
        let input = |bf16: u64, f32: u64, cols: usize| Input {
            bf16,
            ldb: cols,
            bf16_rows: rows,
            f32,
            n,
        };
        let (b, w, k) = (&self.bufs, &self.weights, &self.k);
        let paged = |l: usize| PagedKv {
            keys: self.kv.keys(l),
            values: self.kv.values(l),
            table: self.kv.table(),
            max_blocks: self.kv.max_blocks(),
        };
        // Decode batches too small to fill the GPU split each row's attention along its
        // sequence (fixed per bucket: the graph bakes it in); prefill chunks take the tiled
        // kernel instead.
        let split = AttnSplit {
            splits: decode_splits(n, heads, kvh, self.sms, self.kv.max_context),
            part_ml: b.attn_ml.ptr(),
            part_acc: b.attn_acc.ptr(),
        };
        match &w.embed.form {
            Form::Raw(t) => k.embed(t.ptr(), b.tokens.ptr(), b.x.ptr(), n, h)?,
            // SAFETY: tokens holds n ids checked < vocab, x holds cap rows of h f32.
            Form::Tbe3(t) => unsafe { self.t3.gather.run(t, b.tokens.ptr(), b.x.ptr(), n)? },
        }
        let mut prev: Option<Product> = None;
        for (l, lw) in w.layers.iter().enumerate() {
            k.rmsnorm_residual(
                b.x.ptr(),
                prev,
                lw.input_norm.ptr(),
                b.xb.ptr(),
                s,
                Some(b.xf.ptr()),
                n,
                h,
                eps,
            )?;
            let qkv = self.product(
                Role::Qkv,
                &lw.qkv,
                input(b.xb.ptr(), b.xf.ptr(), h),
                b.qkv.ptr(),
            )?;
            k.rope_qkv_store(
                qkv,
                n,
                b.cos.ptr(),
                b.sin.ptr(),
                b.pos.ptr(),
                b.slot.ptr(),
                b.q.ptr(),
                paged(l),
                heads,
                kvh,
                hd,
            )?;
            match attend {
                Attend::Decode => k.attention(
                    b.q.ptr(),
                    paged(l),
                    b.pos.ptr(),
                    b.slot.ptr(),
                    b.ab.ptr(),
                    s,
                    Some(b.af.ptr()),
                    n,
                    heads,
                    kvh,
                    hd,
                    split,
                )?,
                // A prompt chunk: one sequence, so the tiled kernel shares each key tile among
                // its queries.
                Attend::Prefill => k.attention_prefill(
                    b.q.ptr(),
                    paged(l),
                    b.pos.ptr(),
                    b.slot.ptr(),
                    b.ab.ptr(),
                    s,
                    Some(b.af.ptr()),
                    n,
                    heads,
                    kvh,
                    hd,
                )?,
                Attend::Mixed {
                    prefill,
                    decode,
                    splits,
                } => {
                    // Each part's rows from row r0: its queries, positions, slots and outputs
                    // offset by r0 rows, its own row count as the kernel's n. The kernels put a
                    // split output's lo row n (their n) rows after its hi row, which is not where
                    // the pass's lo rows are, so the parts write hi and f32 rows only and
                    // `split_f32` makes the pass's hi and lo rows from the f32 ones (the same
                    // bits the kernels' split output has).
                    let at = |r0: usize| {
                        let r0 = r0 as u64;
                        let qd64 = qd as u64;
                        (
                            b.q.ptr() + 4 * r0 * qd64,
                            b.pos.ptr() + 4 * r0,
                            b.slot.ptr() + 4 * r0,
                            b.ab.ptr() + 2 * r0 * qd64,
                            b.af.ptr() + 4 * r0 * qd64,
                        )
                    };
                    for &(r0, rows) in prefill {
                        let (q, pos, slot, ab, af) = at(r0);
                        k.attention_prefill(
                            q,
                            paged(l),
                            pos,
                            slot,
                            ab,
                            false,
                            Some(af),
                            rows,
                            heads,
                            kvh,
                            hd,
                        )?;
                    }
                    if let Some((r0, rows)) = decode {
                        let (q, pos, slot, ab, af) = at(r0);
                        k.attention(
                            q,
                            paged(l),
                            pos,
                            slot,
                            ab,
                            false,
                            Some(af),
                            rows,
                            heads,
                            kvh,
                            hd,
                            AttnSplit {
                                splits,
                                part_ml: b.attn_ml.ptr(),
                                part_acc: b.attn_acc.ptr(),
                            },
                        )?;
                    }
                    if s {
                        k.split_f32(b.af.ptr(), n * qd, b.ab.ptr())?;
                    }
                }
            }
            let o = self.product(Role::O, &lw.o, input(b.ab.ptr(), b.af.ptr(), qd), b.y.ptr())?;
            k.rmsnorm_residual(
                b.x.ptr(),
                Some(o),
                lw.post_norm.ptr(),
                b.xb.ptr(),
                s,
                Some(b.xf.ptr()),
                n,
                h,
                eps,
            )?;
            let gu = self.product(
                Role::GateUp,
                &lw.gate_up,
                input(b.xb.ptr(), b.xf.ptr(), h),
                b.gu.ptr(),
            )?;
            k.silu_mul(gu, n, im, b.mb.ptr(), s, Some(b.mf.ptr()))?;
            prev = Some(self.product(
                Role::Down,
                &lw.down,
                input(b.mb.ptr(), b.mf.ptr(), im),
                b.y.ptr(),
            )?);
        }
        if want == Want::None {
            return Ok(());
        }
        k.rmsnorm_residual(
            b.x.ptr(),
            prev,
            w.norm.ptr(),
            b.xb.ptr(),
            s,
            Some(b.xf.ptr()),
            n,
            h,
            eps,
        )?;
        let head = w.lm_head.as_ref().unwrap_or(&w.embed);
        let (x, m, out0) = match want {
            // Row n-1 (and its lo row 2n-1, n rows further): BF16 rows n*h elements apart.
            Want::Last => (
                Input {
                    bf16: b.xb.ptr() + 2 * ((n - 1) * h) as u64,
                    ldb: n * h,
                    bf16_rows: if s { 2 } else { 1 },
                    f32: b.xf.ptr() + 4 * ((n - 1) * h) as u64,
                    n: 1,
                },
                1,
                0,
            ),
            // The wanted rows gathered into buffers the last layer is done with: BF16 rows (hi,
            // then lo m rows further) into y (f32 2 cap x h: room for 2 m BF16 rows many times
            // over) and f32 rows into x (cap x h: the residual stream, read for the last time by
            // the final norm above).
            Want::Gathered { rows: m, out0 } => {
                k.gather_rows(
                    b.xb.ptr(),
                    b.xf.ptr(),
                    s,
                    n,
                    h,
                    b.gather.ptr(),
                    m,
                    b.y.ptr(),
                    b.x.ptr(),
                )?;
                (
                    Input {
                        bf16: b.y.ptr(),
                        ldb: h,
                        bf16_rows: if s { 2 * m } else { m },
                        f32: b.x.ptr(),
                        n: m,
                    },
                    m,
                    out0,
                )
            }
            _ => (input(b.xb.ptr(), b.xf.ptr(), h), n, 0),
        };
        let logits = self.product(Role::LmHead, head, x, b.logits_raw.ptr())?;
        k.split_sum(logits, m, vocab, b.logits.ptr() + 4 * (out0 * vocab) as u64)
    }

    /// Queues a pass's inputs through the staging memory, without waiting.
    pub(super) fn upload_inputs(
        &mut self,
        tokens: &[i32],
        pos: &[i32],
        slots: &[i32],
    ) -> GpuResult<()> {
        self.staging.upload(&self.bufs.tokens, 0, tokens)?;
        self.staging.upload(&self.bufs.pos, 0, pos)?;
        self.staging.upload(&self.bufs.slot, 0, slots)
    }

    pub(super) fn copy_logits(&mut self, rows: usize) -> GpuResult<Vec<f32>> {
        let n = rows * self.cfg.vocab_size;
        self.host_logits.copy_from(self.bufs.logits.ptr(), n)?;
        Ok(self.host_logits.slice(n).to_vec())
    }

    pub(super) fn check_token(&self, token: u32) -> Result<(), DeviceError> {
        if token as usize >= self.cfg.vocab_size {
            return Err(DeviceError::BadToken {
                token,
                vocab: self.cfg.vocab_size,
            });
        }
        Ok(())
    }

    pub(super) fn check_room(&self, seq: SeqId, want: usize) -> Result<(), DeviceError> {
        if want > self.kv.max_context {
            return Err(DeviceError::ContextFull {
                seq,
                want,
                max: self.kv.max_context,
            });
        }
        Ok(())
    }

    /// Runs one decode step, leaving the logits of its `batch.len()` rows in `bufs.logits`;
    /// records its device time and bucket (the copy and argmax times start at 0).
    pub(super) fn run_decode(&mut self, batch: &[DecodeItem]) -> GpuResult<()> {
        self.logit_rows = 0;
        self.ctx.bind()?;
        let n = batch.len();
        let bucket = if self.opts.graphs {
            pick_bucket(&self.buckets, n)
                .ok_or_else(|| GpuError::invalid(format!("batch of {n} exceeds every bucket")))?
        } else {
            n
        };
        let (tokens, pos, slots) = decode_inputs(batch, bucket, self.kv.pad_slot());
        self.upload_inputs(&tokens, &pos, &slots)?;
        // A bucket's first step runs eagerly (warming up cuBLAS's and the kernels' lazy loading
        // outside any capture, as graph capture wants), and is captured after it for the next
        // steps. Capture does not run the work; the graph reads the input buffers above, which
        // every step rewrites in place before its replay.
        let graph = if self.opts.graphs {
            self.graphs.get(&bucket)
        } else {
            None
        };
        let eager_only = self.graphless.contains_key(&bucket);
        let graph_used = graph.is_some();
        self.step_timed = false;
        self.step_events.0.record()?;
        match graph {
            Some(g) => g.launch()?,
            None => self.enqueue(bucket, Want::All)?,
        }
        self.step_events.1.record()?;
        self.step_timed = true;
        if self.opts.graphs && !eager_only && !self.graphs.contains_key(&bucket) {
            // Once per bucket: capture from an idle stream, the eager step above finished.
            self.ctx.sync()?;
            // A failed capture is not a failed step: the step above already ran eagerly, and
            // this bucket keeps running eagerly (slower launches, same results).
            match Graph::capture(&self.ctx, || self.enqueue(bucket, Want::All)) {
                Ok(g) => {
                    self.graphs.insert(bucket, g);
                }
                Err(e) => {
                    tracing::warn!(bucket, error = %e, "CUDA graph capture failed; this bucket runs without a graph");
                    eprintln!(
                        "unweight: CUDA graph capture failed for batch bucket {bucket} ({e}); it runs without a graph"
                    );
                    self.graphless.insert(bucket, e.to_string());
                }
            }
        }
        // gpu_ms is read from the events once the step's ids or logits are back.
        self.timing = StepTiming {
            graph: graph_used,
            bucket,
            ..StepTiming::default()
        };
        self.logit_rows = n;
        Ok(())
    }

    /// The last decode step's device time into `timing.gpu_ms`, once the stream was
    /// synchronised after it (its events are complete then: no wait).
    pub(super) fn settle_step_time(&mut self) -> GpuResult<()> {
        if std::mem::take(&mut self.step_timed) {
            self.timing.gpu_ms = self.step_events.0.elapsed_ms(&self.step_events.1)? as f64;
        }
        Ok(())
    }

    /// A decode step whose logits are copied back. It waits for the step before the copy, so
    /// `copy_ms` is the copy alone (this is the benchmark's reference path; serving steps take
    /// ids, with one synchronisation).
    pub(super) fn decode_inner(&mut self, batch: &[DecodeItem]) -> GpuResult<Vec<f32>> {
        self.run_decode(batch)?;
        self.ctx.sync()?;
        self.settle_step_time()?;
        let t = Instant::now();
        let logits = self.copy_logits(batch.len())?;
        self.timing.copy_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(logits)
    }

    pub(super) fn prefill_inner(
        &mut self,
        seq: SeqId,
        start: usize,
        tokens: &[u32],
    ) -> GpuResult<Vec<f32>> {
        self.prefill_enqueue(seq, start, tokens)?;
        self.copy_logits(1)
    }

    /// Queues a prefill of `tokens` at positions from `start`, leaving the logits after the
    /// last of them in row 0 of `bufs.logits` (not copied back, not waited for).
    pub(super) fn prefill_enqueue(
        &mut self,
        seq: SeqId,
        start: usize,
        tokens: &[u32],
    ) -> GpuResult<()> {
        self.logit_rows = 0;
        self.ctx.bind()?;
        let chunks: Vec<&[u32]> = tokens
            .chunks(self.cap.min(self.opts.max_prefill_tokens))
            .collect();
        let mut p = start;
        for (ci, chunk) in chunks.iter().enumerate() {
            let n = chunk.len();
            let toks: Vec<i32> = chunk.iter().map(|&t| t as i32).collect();
            let pos: Vec<i32> = (p..p + n).map(|x| x as i32).collect();
            let slots = vec![paged::slot_of(seq) as i32; n];
            self.upload_inputs(&toks, &pos, &slots)?;
            let last = ci + 1 == chunks.len();
            self.enqueue(n, if last { Want::Last } else { Want::None })?;
            p += n;
        }
        Ok(())
    }
}
