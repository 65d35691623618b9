//! Making a [`CudaBackend`]: the plan resolved, the weights streamed or uploaded (or shared
//! with another instance), every buffer, graph bucket and the paged KV cache allocated once.

use super::*;

fn with_resolved_plan(
    opts: &CudaOptions,
    plan: PlanSource,
    source: String,
    build: impl FnOnce(&CudaOptions) -> Result<CudaBackend, DeviceError>,
) -> Result<CudaBackend, DeviceError> {
    let opts = CudaOptions {
        plan,
        ..opts.clone()
    };
    let mut b = build(&opts)?;
    b.plan.source = if opts.twin {
        format!("{source} (raw twin)")
    } else {
        source
    };
    tracing::info!(plan = %b.plan.source, "CUDA backend plan");
    Ok(b)
}

/// The plan [`PlanSource::Auto`] resolves to: `dir`'s tuning table for this device, or one made
/// now from `samples` (and saved there); should tuning fail, the default plan, with a warning.
/// Returns the plan and where it came from.
fn resolve_auto<'a>(
    cfg: &LlamaConfig,
    dir: &Path,
    opts: &CudaOptions,
    samples: impl FnOnce() -> Result<Vec<crate::device::cuda::tune::Sample<'a>>, DeviceError>,
) -> Result<(PlanSource, String), DeviceError> {
    Ok(
        match crate::device::cuda::tune::table_for_model(
            dir,
            &role_shapes(cfg)?,
            samples,
            opts.ordinal,
            &crate::device::cuda::tune::TuneOptions::default(),
        ) {
            Ok((t, source)) => (PlanSource::Table(t), source),
            Err(e) => {
                tracing::warn!(error = %e, "tuning failed; using the default plan");
                (
                    PlanSource::Compressed,
                    format!("default (tuning failed: {e})"),
                )
            }
        },
    )
}

/// What a `build` closure makes: the device weights, their key in [`device_weights`] when
/// they are shared there, and whether they were already there (loaded by another instance).
type Made = (Arc<Weights>, Option<WeightsKey>, bool);

/// Largest number of tokens one pass may take: the attention grid's y dimension.
const MAX_PASS_TOKENS: usize = 65535;

impl CudaBackend {
    /// Reads `config.json` and streams the weights of a checkpoint directory to the device
    /// tensor by tensor ([`stream_weights_persisted`]: read, decode, encode the plan's runtime
    /// form, upload, drop), so no host copy of the model is made or kept. The tbe3 images are
    /// computed once per model: persisted in `dir/runtime/` at the first load and read from
    /// there by later ones. Another instance's device copy of the same weights in the same
    /// forms on the same GPU is shared instead of loading again. With
    /// [`PlanSource::Auto`] the tuning table of `dir` is used, or made from layer 0's matrices
    /// read from the checkpoint; should tuning fail, the default plan is used with a warning.
    pub fn load(dir: &Path, opts: &CudaOptions) -> Result<Self, DeviceError> {
        let cfg = LlamaConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir).map_err(WeightError::from)?;
        let auto_dir = match &opts.plan {
            PlanSource::Auto { dir: Some(d) } => Some(d.clone()),
            PlanSource::Auto { dir: None } => Some(dir.to_path_buf()),
            _ => None,
        };
        if let Some(tune_dir) = auto_dir {
            let (plan, source) = resolve_auto(&cfg, &tune_dir, opts, || {
                crate::device::cuda::tune::checkpoint_samples(&ckpt, &cfg)
            })?;
            return with_resolved_plan(opts, plan, source, |opts| {
                Self::load_streamed(cfg, &ckpt, opts)
            });
        }
        Self::load_streamed(cfg, &ckpt, opts)
    }

    /// [`CudaBackend::load`] once the plan is known (not [`PlanSource::Auto`]): the device copy
    /// another instance of the same weights in the same forms holds on this device, else the
    /// weights streamed to the device with the runtime form persisted in the model directory
    /// ([`stream_weights_persisted`]: read from there when it was persisted before).
    pub(super) fn load_streamed(
        cfg: LlamaConfig,
        ckpt: &Checkpoint,
        opts: &CudaOptions,
    ) -> Result<Self, DeviceError> {
        let layers = cfg.num_hidden_layers;
        let model = cfg.clone();
        let dir = ckpt.dir().to_path_buf();
        let identity = weights_identity(ckpt);
        Self::build(cfg, opts, |ctx, _k, plan| {
            let upload = || {
                let mut sink = UploadSink {
                    ctx,
                    linears: Default::default(),
                    vectors: Default::default(),
                };
                let (t, persisted) = stream_weights_persisted(ckpt, &model, plan, &mut sink, &dir)?;
                tracing::info!(
                    read_decode_s = t.read_decode_s,
                    encode_s = t.encode_s,
                    encoded = t.encoded,
                    persisted_read_s = t.persisted_read_s,
                    from_persisted = t.from_persisted,
                    persisted_write_s = t.persisted_write_s,
                    upload_s = t.sink_s,
                    runtime_form = ?persisted,
                    "weights streamed to the device"
                );
                sink.finish(layers)
            };
            match &identity {
                Ok(id) => {
                    let key = WeightsKey::new(id.clone(), opts.ordinal, plan);
                    let (w, reused) = device_weights().get_or_load(&key, upload)?;
                    if reused {
                        tracing::info!(
                            ordinal = opts.ordinal,
                            "the weights are already on this GPU (another instance of the \
                             model): sharing that copy"
                        );
                    }
                    Ok((w, Some(key), reused))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the weights' identity could not be read; this instance's device copy is not shared");
                    Ok((Arc::new(upload()?), None, false))
                }
            }
        })
    }

    /// Uploads loaded weights (which must be
    /// [`WeightMode::Decoded`](crate::model::weights::WeightMode::Decoded)). With
    /// [`PlanSource::Auto`] and a directory, its tuning table is used, or made (layer 0's
    /// matrices are the samples); should tuning fail, the default plan is used with a warning.
    pub fn from_weights(
        cfg: LlamaConfig,
        w: &LlamaWeights,
        opts: &CudaOptions,
    ) -> Result<Self, DeviceError> {
        if let PlanSource::Auto { dir: Some(dir) } = &opts.plan {
            let (plan, source) = resolve_auto(&cfg, dir, opts, || {
                crate::device::cuda::tune::layer0_samples(w)
            })?;
            return with_resolved_plan(opts, plan, source, |opts| Self::from_weights(cfg, w, opts));
        }
        Self::build(cfg, opts, |ctx, _k, plan| {
            let st = |r: Role| plan.storage(r);
            let layers = w
                .layers
                .iter()
                .map(|lw| {
                    Ok(LayerW {
                        input_norm: DevBuf::from_host(ctx, &lw.input_norm)?,
                        qkv: upload_linear(
                            ctx,
                            &[&lw.q_proj, &lw.k_proj, &lw.v_proj],
                            st(Role::Qkv),
                        )?,
                        o: upload_linear(ctx, &[&lw.o_proj], st(Role::O))?,
                        post_norm: DevBuf::from_host(ctx, &lw.post_attention_norm)?,
                        gate_up: upload_linear(
                            ctx,
                            &[&lw.gate_proj, &lw.up_proj],
                            st(Role::GateUp),
                        )?,
                        down: upload_linear(ctx, &[&lw.down_proj], st(Role::Down))?,
                    })
                })
                .collect::<Result<Vec<_>, DeviceError>>()?;
            let w = Weights {
                embed: upload_linear(ctx, &[&w.embed_tokens], plan.embed)?,
                layers,
                norm: DevBuf::from_host(ctx, &w.norm)?,
                lm_head: w
                    .lm_head
                    .as_ref()
                    .map(|m| upload_linear(ctx, &[m], st(Role::LmHead)))
                    .transpose()?,
            };
            Ok((Arc::new(w), None, false))
        })
    }

    /// A model of `cfg`'s shape whose weights are generated in device memory: every matrix
    /// N(0, sigma) BF16 from `seed`, norms 1.0. For benchmarks at real scale (an 8B model)
    /// without writing or uploading 16 GB. Matrices the plan stores as tbe3 are generated once
    /// per role, encoded on the CPU and copied into every layer (same bytes moved per step as
    /// distinct values; the raw ones are distinct per layer). With `opts.twin` the same roles
    /// are generated once and copied raw, so the twin holds exactly the weights of the plan it
    /// twins (the same seeds in the same order) and its logits can be compared bit for bit.
    pub fn synthetic(
        cfg: LlamaConfig,
        seed: u64,
        sigma: f32,
        opts: &CudaOptions,
    ) -> Result<Self, DeviceError> {
        let layers = cfg.num_hidden_layers;
        let tied = cfg.tie_word_embeddings;
        let shapes = role_shapes(&cfg)?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        // Which roles are shared across layers: those the plan (before any twinning) stores as
        // tbe3. Storage never depends on the device's multiprocessors, so 1 will do here.
        let untwinned = CudaOptions {
            twin: false,
            ..opts.clone()
        };
        let shared = resolve_plan(&untwinned, &shapes, 1, tied);
        Self::build(cfg, opts, |ctx, k, plan| {
            let mut tensor = 0u64;
            let mut raw = |elems: usize| -> Result<DevBuf, DeviceError> {
                let b = DevBuf::new(ctx, 2 * elems)?;
                tensor += 1;
                k.fill_normal_bf16(
                    b.ptr(),
                    elems,
                    seed ^ tensor.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    sigma,
                )?;
                Ok(b)
            };
            // One matrix per shared role: a tbe3 image encoded from a generated matrix
            // (downloaded once), or, in the raw twin, the generated matrix itself.
            let mut images = std::collections::BTreeMap::new();
            for (&role, shape) in &shapes {
                if shared.storage(role) == Storage::Tbe3 && !(role == Role::LmHead && tied) {
                    let b = raw(shape.len())?;
                    let one = if plan.storage(role) == Storage::Tbe3 {
                        ctx.sync()?;
                        let mut bytes = vec![0u8; 2 * shape.len()];
                        b.download(&mut bytes)?;
                        Linear::upload(ctx, &bytes, shape.rows, shape.cols, Storage::Tbe3)?
                    } else {
                        Linear::raw(b, shape.rows, shape.cols)?
                    };
                    images.insert(role, one);
                }
            }
            let mut linear = |role: Role| -> Result<Linear, DeviceError> {
                let s = shapes[&role];
                match images.get(&role).map(|l| &l.form) {
                    Some(crate::device::cuda::linear::Form::Tbe3(m)) => Ok(Linear {
                        shape: s,
                        form: crate::device::cuda::linear::Form::Tbe3(m.duplicate(ctx)?),
                    }),
                    Some(crate::device::cuda::linear::Form::Raw(b)) => {
                        let c = DevBuf::new(ctx, 2 * s.len())?;
                        // SAFETY: both buffers hold the role's `2 × rows × cols` bytes.
                        unsafe {
                            crate::device::cuda::driver::copy_dtod(
                                ctx,
                                c.ptr(),
                                b.ptr(),
                                2 * s.len(),
                            )?
                        };
                        Ok(Linear::raw(c, s.rows, s.cols)?)
                    }
                    None => Ok(Linear::raw(raw(s.len())?, s.rows, s.cols)?),
                }
            };
            let ones = |elems: usize| -> Result<DevBuf, DeviceError> {
                let b = DevBuf::new(ctx, 4 * elems)?;
                k.fill_f32(b.ptr(), elems, 1.0)?;
                Ok(b)
            };
            let mut ls = Vec::with_capacity(layers);
            for _ in 0..layers {
                ls.push(LayerW {
                    input_norm: ones(h)?,
                    qkv: linear(Role::Qkv)?,
                    o: linear(Role::O)?,
                    post_norm: ones(h)?,
                    gate_up: linear(Role::GateUp)?,
                    down: linear(Role::Down)?,
                });
            }
            let lm_head = if tied {
                None
            } else {
                Some(linear(Role::LmHead)?)
            };
            // The embedding: a copy of lm_head's shared matrix when there is one (same shape),
            // else generated (and encoded when the plan compresses it).
            let embed = if shared.embed == Storage::Tbe3 && images.contains_key(&Role::LmHead) {
                linear(Role::LmHead)?
            } else {
                let b = raw(v * h)?;
                if plan.embed == Storage::Tbe3 {
                    ctx.sync()?;
                    let mut bytes = vec![0u8; 2 * v * h];
                    b.download(&mut bytes)?;
                    Linear::upload(ctx, &bytes, v, h, Storage::Tbe3)?
                } else {
                    Linear::raw(b, v, h)?
                }
            };
            let w = Weights {
                embed,
                layers: ls,
                norm: ones(h)?,
                lm_head,
            };
            Ok((Arc::new(w), None, false))
        })
    }

    pub(super) fn build(
        cfg: LlamaConfig,
        opts: &CudaOptions,
        make: impl FnOnce(&Arc<Context>, &Kernels, &Plan) -> Result<Made, DeviceError>,
    ) -> Result<Self, DeviceError> {
        let hd = cfg.head_dim;
        if !hd.is_multiple_of(32) || hd > ATTN_MAX_HEAD_DIM {
            return Err(DeviceError::Invalid(format!(
                "the CUDA attention kernel needs head_dim a multiple of 32 up to {ATTN_MAX_HEAD_DIM}; this model has {hd}"
            )));
        }
        if opts.max_sequences == 0 || opts.max_prefill_tokens == 0 {
            return Err(DeviceError::Invalid(
                "max_sequences and max_prefill_tokens must be at least 1".into(),
            ));
        }
        if opts.max_sequences > MAX_PASS_TOKENS || opts.max_prefill_tokens > MAX_PASS_TOKENS {
            return Err(DeviceError::Invalid(format!(
                "max_sequences and max_prefill_tokens must be at most {MAX_PASS_TOKENS} (the attention grid)"
            )));
        }
        let max_context = opts
            .max_context
            .unwrap_or(4096)
            .min(cfg.max_position_embeddings)
            .max(1);
        if !crate::device::cuda::kernels::built_with_kernels() {
            return Err(DeviceError::cuda(
                "built without CUDA kernels (nvcc was not found when the crate was compiled)"
                    .into(),
            ));
        }
        let ctx = Context::new(opts.ordinal)?;
        let k = Kernels::load(&ctx)?;
        let t3 = Tbe3Kernels::load(&ctx)?;
        let blas = Cublas::new(&ctx)?;
        let sms = multiprocessors(&ctx)?;
        let shapes = role_shapes(&cfg)?;
        let plan = resolve_plan(opts, &shapes, sms, cfg.tie_word_embeddings);
        let (weights, shared_key, reused_weights) = make(&ctx, &k, &plan)?;
        ctx.sync()?;
        let (h, v, kvd) = (cfg.hidden_size, cfg.vocab_size, cfg.kv_dim());
        let mut weight_bytes = 0;
        for lw in &weights.layers {
            weight_bytes += lw.qkv.bytes() + lw.o.bytes() + lw.gate_up.bytes() + lw.down.bytes();
        }
        weight_bytes += weights.lm_head.as_ref().unwrap_or(&weights.embed).bytes();
        // Memory: every matrix once (a tied lm_head is the embedding), plus the norms.
        let weight_memory = weight_bytes
            + if weights.lm_head.is_some() {
                weights.embed.bytes()
            } else {
                0
            }
            + 4 * h * (2 * weights.layers.len() + 1);
        // Work buffers for the larger of a decode batch and a prefill chunk (sized by
        // `WorkBuffers`, which `unweight plan-memory` counts too).
        let wb = WorkBuffers::new(&cfg, &plan, &shapes, opts, max_context);
        let (cap, lcap) = (wb.cap, opts.max_sequences);
        let inv_freq = cfg.rope_inv_freq();
        let half = hd / 2;
        let (mut cos, mut sin) = (
            vec![0f32; max_context * half],
            vec![0f32; max_context * half],
        );
        for p in 0..max_context {
            for (i, &f) in inv_freq.iter().enumerate() {
                // As ops::rope_table: the angle in f64, rounded to f32 after cos/sin.
                let a = p as f64 * f;
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        let buf = |bytes: usize| DevBuf::new(&ctx, bytes);
        let bufs = Bufs {
            tokens: buf(wb.tokens)?,
            pos: buf(wb.pos)?,
            slot: buf(wb.slot)?,
            x: buf(wb.x)?,
            xb: buf(wb.xb)?,
            xf: buf(wb.xf)?,
            af: buf(wb.af)?,
            mf: buf(wb.mf)?,
            scratch: buf(wb.scratch)?,
            partial: buf(wb.partial)?,
            qkv: buf(wb.qkv)?,
            q: buf(wb.q)?,
            ab: buf(wb.ab)?,
            y: buf(wb.y)?,
            gu: buf(wb.gu)?,
            mb: buf(wb.mb)?,
            logits_raw: buf(wb.logits_raw)?,
            logits: buf(wb.logits)?,
            ids: buf(wb.ids)?,
            gather: buf(wb.gather)?,
            sample_rows: buf(wb.sample_rows)?,
            attn_ml: buf(wb.attn_ml)?,
            attn_acc: buf(wb.attn_acc)?,
            cos: DevBuf::from_host(&ctx, &cos)?,
            sin: DevBuf::from_host(&ctx, &sin)?,
        };
        debug_assert_eq!(2 * 4 * cos.len(), wb.rope);
        let host_logits = PinnedBuf::new(&ctx, lcap * v)?;
        // The KV cache from what is left.
        let (free, _) = ctx.mem_info()?;
        let reserve = 512usize << 20; // graphs, cuBLAS internals, fragmentation
        let max_sequences = opts.max_sequences;
        let table_bytes = 4 * (max_sequences + 1) * paged::blocks_for(max_context);
        let (_, total_blocks) = kv_plan(
            free,
            reserve,
            opts.kv_budget_bytes,
            opts.kv_fraction,
            paged::block_bytes(cfg.num_hidden_layers, kvd),
            table_bytes,
            max_sequences,
            max_context,
        )
        .map_err(DeviceError::Invalid)?;
        let kv = KvCache::new(
            &ctx,
            cfg.num_hidden_layers,
            kvd,
            total_blocks,
            max_sequences,
            max_context,
        )?;
        let buckets = decode_buckets(max_sequences);
        let step_events = (Event::new(&ctx)?, Event::new(&ctx)?);
        let choice_events = (Event::new(&ctx)?, Event::new(&ctx)?);
        let host_ids = IdsDownload::new(&ctx, lcap)?;
        let staging = Staging::new(&ctx, STAGING_BYTES)?;
        Ok(Self {
            cfg,
            graphs: HashMap::new(),
            graphless: HashMap::new(),
            host_logits,
            kv,
            bufs,
            weights,
            shared_key,
            reused_weights,
            blas,
            k,
            t3,
            plan,
            shapes,
            sms,
            staging,
            step_events,
            step_timed: false,
            choice_events,
            host_ids,
            ctx,
            opts: opts.clone(),
            cap,
            buckets,
            weight_bytes,
            weight_memory,
            timing: StepTiming::default(),
            logit_rows: 0,
            in_flight: None,
        })
    }
}
