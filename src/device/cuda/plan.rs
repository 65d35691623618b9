//! How each linear layer runs on the GPU: where its weight lives ([`Storage`]), which kernel
//! family multiplies by it at each batch size ([`Strategy`]), and the tuning table the choice
//! comes from ([`TuneTable`], written by the autotuner, `tune`).
//!
//! Pure data and decisions (no device calls), so the rules are tested on machines without a GPU.
//! A [`Plan`] is what the backend consults per step: for each [`Role`], one storage form and a
//! strategy per batch bucket. Every strategy runs on either storage form with the same geometry
//! and the same arithmetic order (on raw BF16 it is the tbe3 kernel's pass-through twin), so a
//! plan and its [`Plan::twin`] on the raw weights give bit-identical logits: that is what
//! "compression never changes a logit" means on the GPU (README, "Bit-exact").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::tbe3::{gemv_geometry, gemv_supported, MAX_GEMV_BATCH};
use crate::codec::runtime::Shape;

/// The linear layers of a Llama layer as the CUDA backend runs them: q|k|v and gate|up are each
/// one fused matrix (their rows stacked), and `lm_head` (or the tied embedding) is the last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// q_proj | k_proj | v_proj, `(q_dim + 2 kv_dim) × hidden`.
    Qkv,
    /// o_proj, `hidden × q_dim`.
    O,
    /// gate_proj | up_proj, `2 intermediate × hidden`.
    GateUp,
    /// down_proj, `hidden × intermediate`.
    Down,
    /// lm_head (the embedding when tied), `vocab × hidden`.
    LmHead,
}

impl Role {
    /// Every role, in the order a step runs them.
    pub const ALL: [Role; 5] = [Role::Qkv, Role::O, Role::GateUp, Role::Down, Role::LmHead];
}

/// As in tuning tables and reports: `qkv`, `o`, `gate_up`, `down`, `lm_head`.
impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Qkv => "qkv",
            Role::O => "o",
            Role::GateUp => "gate_up",
            Role::Down => "down",
            Role::LmHead => "lm_head",
        })
    }
}

/// A short label for reports: `cublas`, `cublas/1024` (row chunks), `gemv/k2` (K chunks),
/// `mma` (tensor cores).
impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Strategy::Cublas { chunk_rows: 0 } => f.write_str("cublas"),
            Strategy::Cublas { chunk_rows } => write!(f, "cublas/{chunk_rows}"),
            Strategy::Gemv { ksplit } => write!(f, "gemv/k{ksplit}"),
            Strategy::Mma => f.write_str("mma"),
        }
    }
}

/// Where a matrix lives in device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// Row-major BF16, as in the checkpoint (2 bytes per weight).
    Raw,
    /// The tbe3 runtime form (docs/format.md §6, about 1.41 bytes per weight).
    Tbe3,
}

/// How a product `Y = X · Wᵀ` with one matrix runs. Every strategy applies to both storage
/// forms; on [`Storage::Raw`] it reads the BF16 weights directly (the pass-through twin).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Strategy {
    /// cuBLAS GEMM (BF16 × split-BF16 activations, f32 accumulation) over row chunks of
    /// `chunk_rows` rows (0: the whole matrix in one call). On tbe3 storage each chunk is first
    /// decoded into a BF16 scratch buffer (strategy 1 of issue 6; chunks small enough to stay in
    /// L2 between the decode and the GEMM are the chunked variant, strategy 4). Raw storage with
    /// `chunk_rows = 0` is the uncompressed baseline.
    Cublas {
        /// Rows per chunk; 0 for all.
        chunk_rows: usize,
    },
    /// The fused GEMV (kernels/tbe3_gemv.cu, strategy 2) with `ksplit` K chunks, for batches of
    /// at most [`MAX_GEMV_BATCH`] rows; f32 activations, decoded weights only in registers.
    Gemv {
        /// K chunks (1: no split, no reduce pass).
        ksplit: usize,
    },
    /// Weights decoded into shared memory feeding the tensor cores (kernels/tbe3_mma.cu,
    /// strategy 3): `mma.sync` BF16 → f32 on the split-BF16 activation rows, for batches past
    /// the GEMV's 8 rows. Needs cols a multiple of 512.
    Mma,
}

impl Strategy {
    /// The uncompressed baseline: one cuBLAS call on raw BF16.
    pub const BASELINE: Strategy = Strategy::Cublas { chunk_rows: 0 };

    /// Whether the product comes out as split rows (hi products, then lo products: cuBLAS on
    /// split activations) rather than one f32 row per token (the GEMV).
    pub fn split_output(&self, split_activations: bool) -> bool {
        match self {
            Strategy::Cublas { .. } | Strategy::Mma => split_activations,
            Strategy::Gemv { .. } => false,
        }
    }

    /// Why this strategy cannot run on `shape` with `batch` activation rows, if it cannot.
    pub fn unsupported(&self, shape: &Shape, batch: usize) -> Option<String> {
        match *self {
            Strategy::Cublas { chunk_rows } => {
                let chunk = if chunk_rows == 0 {
                    shape.rows
                } else {
                    chunk_rows
                };
                // A chunk must start on a tile (and 512-weight) boundary for the range decode,
                // and on a 256-byte boundary for cuBLAS, on both storage forms alike.
                let span = shape.tile_elems.max(super::tbe3::STEP);
                if chunk < shape.rows && !(chunk * shape.cols).is_multiple_of(span) {
                    return Some(format!(
                        "chunks of {chunk} rows × {} columns do not start on {span}-weight boundaries",
                        shape.cols
                    ));
                }
                None
            }
            Strategy::Gemv { ksplit } => {
                if let Err(e) = gemv_supported(shape, batch) {
                    return Some(e);
                }
                if ksplit == 0 {
                    return Some("ksplit 0".into());
                }
                None
            }
            // The activation stride is checked at the launch (the engine's rows are `cols`
            // apart, or `n × cols` for the last row of a prompt: multiples of 8 when cols is).
            Strategy::Mma => super::mma::mma_unsupported(shape, shape.cols),
        }
    }
}

/// Powers of two up to 256: the batch sizes the tuner measures and `bench kernels` reports.
pub const TUNE_BATCHES: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// The bucket of [`TUNE_BATCHES`] whose entry serves a product of `n` rows: the smallest that
/// holds `n`, else the largest.
pub fn tune_bucket(n: usize) -> usize {
    TUNE_BATCHES
        .iter()
        .copied()
        .find(|&b| b >= n)
        .unwrap_or(TUNE_BATCHES[TUNE_BATCHES.len() - 1])
}

/// The candidates the tuner times for one matrix and batch: the baseline, cuBLAS after a whole
/// decode, cuBLAS after chunked decodes sized to about 1/4, 1/8 and 1/16 of the L2 cache,
/// (batches up to 8) the fused GEMV with the heuristic split and its neighbours, and (batches
/// of 8 and more) the tensor-core kernel. Each strategy
/// is timed on both storage forms (`Storage::Raw` with `Cublas { chunk_rows: 0 }` is the
/// baseline). Only strategies that support the shape are returned.
pub fn candidates(shape: &Shape, batch: usize, sms: usize, l2_bytes: usize) -> Vec<Strategy> {
    let mut out = vec![Strategy::BASELINE];
    for div in [4usize, 8, 16] {
        let rows = pow2_rows(l2_bytes / div, shape.cols);
        if rows < shape.rows {
            out.push(Strategy::Cublas { chunk_rows: rows });
        }
    }
    if batch <= MAX_GEMV_BATCH {
        if let Ok(g) = gemv_geometry(shape, batch, sms) {
            for k in [g.ksplit / 2, g.ksplit, g.ksplit * 2] {
                if k >= 1 {
                    out.push(Strategy::Gemv { ksplit: k });
                }
            }
        }
    }
    if batch >= MAX_GEMV_BATCH {
        out.push(Strategy::Mma);
    }
    out.retain(|s| s.unsupported(shape, batch).is_none());
    out.sort();
    out.dedup();
    out
}

/// The most BF16 rows of `cols` that fit `bytes`, rounded down to a power of two (at least 1):
/// a power-of-two row count keeps tile boundaries for every shape whose tile divides the row.
fn pow2_rows(bytes: usize, cols: usize) -> usize {
    let rows = (bytes / (2 * cols.max(1))).max(1);
    1usize << (usize::BITS - 1 - rows.leading_zeros())
}

/// Scratch bytes of the default chunked decode: small enough to stay in L2 between the decode
/// and the GEMM that reads it, and to keep the scratch buffer small next to the weights.
pub const DEFAULT_CHUNK_BYTES: usize = 16 << 20;

/// cuBLAS over chunks of at most [`DEFAULT_CHUNK_BYTES`] of BF16 (a power-of-two row count), or
/// over the whole matrix when it is that small or no such chunk keeps tile boundaries.
pub fn default_chunked(shape: &Shape) -> Strategy {
    let rows = pow2_rows(DEFAULT_CHUNK_BYTES, shape.cols);
    let s = Strategy::Cublas { chunk_rows: rows };
    if rows < shape.rows && s.unsupported(shape, 1).is_none() {
        s
    } else {
        Strategy::BASELINE
    }
}

/// The strategy the backend uses for a product without a tuning table: the fused GEMV where it
/// applies (the heuristic split), else [`default_chunked`].
pub fn default_strategy(shape: &Shape, batch: usize, sms: usize) -> Strategy {
    if batch <= MAX_GEMV_BATCH {
        if let Ok(g) = gemv_geometry(shape, batch, sms) {
            return Strategy::Gemv { ksplit: g.ksplit };
        }
    }
    default_chunked(shape)
}

/// What a tuning table was measured on. A table is used only where all four match: another GPU,
/// driver or kernel build may rank the strategies differently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TuneKey {
    /// The device name ("NVIDIA H100 80GB HBM3").
    pub device: String,
    /// The driver's CUDA version (`major * 1000 + minor * 10`).
    pub driver: i32,
    /// A hash of the embedded kernel images (changes whenever a kernel or nvcc changes).
    pub kernels: String,
    /// Version of the runtime form and of this table's layout.
    pub format: u32,
}

/// The layout version of [`TuneTable`] and the tbe3 form it was measured with.
pub const TUNE_FORMAT: u32 = 1;

/// One candidate's time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Where the weight lived.
    pub storage: Storage,
    /// How the product ran.
    pub strategy: Strategy,
    /// Median device time of one product, microseconds.
    pub us: f64,
}

/// The timings of one matrix at one batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneEntry {
    /// Which matrix.
    pub role: Role,
    /// Its rows.
    pub rows: usize,
    /// Its columns.
    pub cols: usize,
    /// Activation rows.
    pub batch: usize,
    /// Every candidate that ran, fastest first.
    pub timings: Vec<Timing>,
}

impl TuneEntry {
    /// The fastest timing on `storage`, if any ran.
    pub fn best(&self, storage: Storage) -> Option<&Timing> {
        self.timings
            .iter()
            .filter(|t| t.storage == storage)
            .min_by(|a, b| a.us.total_cmp(&b.us))
    }
}

/// The autotuner's output for one model on one device: stored as JSON in the model directory
/// (`tune/<device>.json`, see `tune::table_path`) and read at load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneTable {
    /// What it was measured on.
    pub key: TuneKey,
    /// When (RFC 3339, UTC).
    pub created: String,
    /// One entry per (role, batch).
    pub entries: Vec<TuneEntry>,
}

impl TuneTable {
    /// The entry of `role` at `batch`, if measured.
    pub fn entry(&self, role: Role, batch: usize) -> Option<&TuneEntry> {
        self.entries
            .iter()
            .find(|e| e.role == role && e.batch == batch)
    }

    /// The storage form for `role` over the batch `buckets` an instance runs: tbe3 unless the
    /// sum over those buckets of the best raw times beats the sum of the best tbe3 times (equal
    /// weight per bucket: a decode server spends its steps across them). Buckets not measured
    /// count for neither. `Raw` when nothing on tbe3 was measured.
    pub fn storage(&self, role: Role, buckets: &[usize]) -> Storage {
        let (mut raw, mut tbe3, mut any) = (0.0, 0.0, false);
        for &b in buckets {
            let Some(e) = self.entry(role, tune_bucket(b)) else {
                continue;
            };
            if let (Some(r), Some(t)) = (e.best(Storage::Raw), e.best(Storage::Tbe3)) {
                raw += r.us;
                tbe3 += t.us;
                any = true;
            }
        }
        if any && tbe3 <= raw {
            Storage::Tbe3
        } else if any {
            Storage::Raw
        } else {
            Storage::Tbe3
        }
    }
}

/// The resolved choice for one role: its storage and a strategy per tuning bucket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RolePlan {
    /// Where the weight lives.
    pub storage: Storage,
    /// Strategy per bucket of [`TUNE_BATCHES`].
    pub by_bucket: BTreeMap<usize, Strategy>,
}

/// What the backend runs: per role, a storage form and a strategy per batch bucket.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// Per role.
    pub roles: BTreeMap<Role, RolePlan>,
    /// The embedding table's storage (the gather decodes one row per token: never tuned, tbe3
    /// wherever the gather supports the shape). A tied `lm_head` is this same table.
    pub embed: Storage,
    /// Where the choice came from ("baseline", "default", "table PATH", "tuned at load").
    pub source: String,
}

/// The shapes of a model's roles, `(rows, cols)`, as tbe3 shapes.
pub type RoleShapes = BTreeMap<Role, Shape>;

/// Per bucket, the fastest strategy `table` measured for `role` on `storage` (when the entry is
/// of this shape and the strategy runs there), else the default for that storage.
fn role_strategies(
    table: Option<&TuneTable>,
    role: Role,
    shape: &Shape,
    storage: Storage,
    sms: usize,
) -> BTreeMap<usize, Strategy> {
    TUNE_BATCHES
        .iter()
        .map(|&b| {
            let measured = table
                .and_then(|t| t.entry(role, b))
                .filter(|e| e.rows == shape.rows && e.cols == shape.cols)
                .and_then(|e| e.best(storage))
                .map(|tm| tm.strategy)
                .filter(|s| s.unsupported(shape, b).is_none());
            let fallback = match storage {
                Storage::Raw => Strategy::BASELINE,
                Storage::Tbe3 => default_strategy(shape, b, sms),
            };
            (b, measured.unwrap_or(fallback))
        })
        .collect()
}

/// Tbe3 for the embedding table (`vocab × hidden`, the shape of [`Role::LmHead`]) when the
/// compressed gather supports its rows, else raw.
fn embed_storage(shapes: &RoleShapes) -> Storage {
    match shapes.get(&Role::LmHead) {
        Some(s) if super::gather::gather_unsupported(s).is_none() => Storage::Tbe3,
        _ => Storage::Raw,
    }
}

impl Plan {
    /// The uncompressed baseline: every matrix raw, every product one cuBLAS call.
    pub fn baseline() -> Self {
        let by_bucket: BTreeMap<usize, Strategy> = TUNE_BATCHES
            .iter()
            .map(|&b| (b, Strategy::BASELINE))
            .collect();
        Self {
            roles: Role::ALL
                .iter()
                .map(|&r| {
                    (
                        r,
                        RolePlan {
                            storage: Storage::Raw,
                            by_bucket: by_bucket.clone(),
                        },
                    )
                })
                .collect(),
            embed: Storage::Raw,
            source: "baseline".into(),
        }
    }

    /// Every matrix in tbe3 form, strategies from [`default_strategy`].
    pub fn default_for(shapes: &RoleShapes, sms: usize) -> Self {
        let roles = shapes
            .iter()
            .map(|(&r, shape)| {
                let by_bucket = TUNE_BATCHES
                    .iter()
                    .map(|&b| (b, default_strategy(shape, b, sms)))
                    .collect();
                (
                    r,
                    RolePlan {
                        storage: Storage::Tbe3,
                        by_bucket,
                    },
                )
            })
            .collect();
        Self {
            roles,
            embed: embed_storage(shapes),
            source: "default".into(),
        }
    }

    /// The plan a tuning table gives for an instance running batch `buckets`: per role the
    /// storage of [`TuneTable::storage`], and per bucket the fastest strategy measured on that
    /// storage (the default strategy where the table has no entry or the entry's shape differs
    /// from the model's).
    pub fn from_table(t: &TuneTable, shapes: &RoleShapes, buckets: &[usize], sms: usize) -> Self {
        let roles = shapes
            .iter()
            .map(|(&r, shape)| {
                let storage = t.storage(r, buckets);
                let by_bucket = role_strategies(Some(t), r, shape, storage, sms);
                (r, RolePlan { storage, by_bucket })
            })
            .collect();
        Self {
            roles,
            embed: embed_storage(shapes),
            source: "table".into(),
        }
    }

    /// Stores `role` as `storage` (a tied `lm_head` must live where the embedding does), and
    /// when that changes its storage, re-picks its strategies for the new storage: from `table`
    /// where measured, else the defaults. A strategy that was fastest on raw weights (a whole
    /// cuBLAS call) can be the slowest, and the most memory-hungry, on tbe3.
    pub fn set_storage(
        &mut self,
        role: Role,
        storage: Storage,
        shape: &Shape,
        sms: usize,
        table: Option<&TuneTable>,
    ) {
        if let Some(rp) = self.roles.get_mut(&role) {
            if rp.storage != storage {
                rp.storage = storage;
                rp.by_bucket = role_strategies(table, role, shape, storage, sms);
            }
        }
    }

    /// The same strategies with every matrix raw: the pass-through twin whose logits must equal
    /// this plan's bit for bit.
    pub fn twin(&self) -> Self {
        let mut p = self.clone();
        for rp in p.roles.values_mut() {
            rp.storage = Storage::Raw;
        }
        p.embed = Storage::Raw;
        p.source = format!("{} (raw twin)", self.source);
        p
    }

    /// The storage of `role` (raw when the plan does not name it).
    pub fn storage(&self, role: Role) -> Storage {
        self.roles.get(&role).map_or(Storage::Raw, |r| r.storage)
    }

    /// The strategy for a product of `n` rows with `role`'s matrix: the entry of
    /// [`tune_bucket`]`(n)`, unless it cannot run `n` rows (a GEMV past 8 rows), then
    /// [`default_chunked`] on tbe3 storage and the baseline on raw.
    pub fn strategy(&self, role: Role, shape: &Shape, n: usize) -> Strategy {
        let r = self.roles.get(&role);
        r.and_then(|r| r.by_bucket.get(&tune_bucket(n)))
            .copied()
            .filter(|s| s.unsupported(shape, n).is_none())
            .unwrap_or_else(|| match r.map(|r| r.storage) {
                Some(Storage::Tbe3) => default_chunked(shape),
                _ => Strategy::BASELINE,
            })
    }

    /// Bytes of BF16 scratch the plan's decodes need for products of up to `max_rows` rows:
    /// the largest chunk any tbe3 matrix decodes into (0 when none does).
    pub fn scratch_bytes(&self, shapes: &RoleShapes, max_rows: usize) -> usize {
        let mut most = 0;
        for (&role, shape) in shapes {
            if self.storage(role) != Storage::Tbe3 {
                continue;
            }
            let mut ns: Vec<usize> = TUNE_BATCHES
                .iter()
                .copied()
                .filter(|&b| b <= max_rows)
                .collect();
            ns.push(max_rows.max(1));
            for n in ns {
                if let Strategy::Cublas { chunk_rows } = self.strategy(role, shape, n) {
                    let rows = if chunk_rows == 0 {
                        shape.rows
                    } else {
                        chunk_rows.min(shape.rows)
                    };
                    most = most.max(2 * rows * shape.cols);
                }
            }
        }
        most
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rows: usize, cols: usize) -> Shape {
        Shape::for_matrix(rows, cols).unwrap()
    }

    #[test]
    fn buckets_round_up_and_saturate() {
        assert_eq!(tune_bucket(1), 1);
        assert_eq!(tune_bucket(3), 4);
        assert_eq!(tune_bucket(9), 16);
        assert_eq!(tune_bucket(256), 256);
        assert_eq!(tune_bucket(512), 256);
    }

    #[test]
    fn candidates_always_include_the_baseline_and_gemv_only_where_it_runs() {
        let s = shape(4096, 4096);
        let c1 = candidates(&s, 1, 132, 50 << 20);
        assert!(c1.contains(&Strategy::BASELINE));
        assert!(c1.iter().any(|c| matches!(c, Strategy::Gemv { .. })));
        let c16 = candidates(&s, 16, 132, 50 << 20);
        assert!(c16.contains(&Strategy::BASELINE));
        assert!(c16.contains(&Strategy::Mma));
        assert!(!c1.contains(&Strategy::Mma));
        assert!(!c16.iter().any(|c| matches!(c, Strategy::Gemv { .. })));
        // Chunked decodes: 50 MiB / 4 / 8 KiB per row -> 1600 -> 1024 rows; /8 -> 512; /16 -> 256.
        for rows in [1024, 512, 256] {
            assert!(
                c16.contains(&Strategy::Cublas { chunk_rows: rows }),
                "{c16:?}"
            );
        }
        // A width the GEMV cannot take (576 = 4.5 groups): no GEMV, and every candidate runs.
        let odd = shape(1536, 576);
        assert!(!candidates(&odd, 64, 132, 50 << 20).contains(&Strategy::Mma));
        let c = candidates(&odd, 1, 132, 50 << 20);
        assert!(
            !c.iter().any(|c| matches!(c, Strategy::Gemv { .. })),
            "{c:?}"
        );
        assert!(c.iter().all(|s| s.unsupported(&odd, 1).is_none()));
    }

    #[test]
    fn chunks_must_keep_tile_boundaries() {
        // 576 columns, tile 2048 (576 is not a multiple of 128): 7 rows = 4032 weights.
        let s = shape(1536, 576);
        assert!(Strategy::Cublas { chunk_rows: 7 }
            .unsupported(&s, 1)
            .is_some());
        assert!(Strategy::Cublas { chunk_rows: 64 }
            .unsupported(&s, 1)
            .is_none());
        assert!(Strategy::Cublas { chunk_rows: 0 }
            .unsupported(&s, 1)
            .is_none());
    }

    fn entry(role: Role, batch: usize, raw: f64, tbe3: f64) -> TuneEntry {
        TuneEntry {
            role,
            rows: 4096,
            cols: 4096,
            batch,
            timings: vec![
                Timing {
                    storage: Storage::Raw,
                    strategy: Strategy::BASELINE,
                    us: raw,
                },
                Timing {
                    storage: Storage::Tbe3,
                    strategy: if batch <= 8 {
                        Strategy::Gemv { ksplit: 2 }
                    } else {
                        Strategy::Cublas { chunk_rows: 512 }
                    },
                    us: tbe3,
                },
            ],
        }
    }

    fn table(entries: Vec<TuneEntry>) -> TuneTable {
        TuneTable {
            key: TuneKey {
                device: "test".into(),
                driver: 13000,
                kernels: "k".into(),
                format: TUNE_FORMAT,
            },
            created: "2026-11-27T00:00:00Z".into(),
            entries,
        }
    }

    #[test]
    fn storage_follows_the_sum_over_the_instances_buckets() {
        // tbe3 wins small batches by 10 us, loses large ones by 30 us.
        let t = table(vec![
            entry(Role::O, 1, 40.0, 30.0),
            entry(Role::O, 2, 40.0, 30.0),
            entry(Role::O, 64, 60.0, 90.0),
        ]);
        assert_eq!(t.storage(Role::O, &[1, 2]), Storage::Tbe3);
        assert_eq!(t.storage(Role::O, &[1, 2, 64]), Storage::Raw);
        // 3 rows use the 4 entry, absent: counts for neither.
        assert_eq!(t.storage(Role::O, &[1, 3]), Storage::Tbe3);
        // A role never measured: tbe3 (the default plan's choice).
        assert_eq!(t.storage(Role::Down, &[1]), Storage::Tbe3);
    }

    #[test]
    fn a_table_plan_takes_the_fastest_on_the_chosen_storage_and_its_twin_keeps_the_strategies() {
        let t = table(vec![
            entry(Role::O, 1, 40.0, 30.0),
            entry(Role::O, 16, 60.0, 50.0),
        ]);
        let shapes: RoleShapes = [(Role::O, shape(4096, 4096))].into_iter().collect();
        let p = Plan::from_table(&t, &shapes, &[1, 16], 132);
        let s = shapes[&Role::O];
        assert_eq!(p.storage(Role::O), Storage::Tbe3);
        assert_eq!(p.strategy(Role::O, &s, 1), Strategy::Gemv { ksplit: 2 });
        assert_eq!(
            p.strategy(Role::O, &s, 9),
            Strategy::Cublas { chunk_rows: 512 }
        );
        // Unmeasured bucket: the default strategy.
        assert_eq!(p.strategy(Role::O, &s, 2), default_strategy(&s, 2, 132));
        let twin = p.twin();
        assert_eq!(twin.storage(Role::O), Storage::Raw);
        for n in [1, 2, 9, 16, 300] {
            assert_eq!(twin.strategy(Role::O, &s, n), p.strategy(Role::O, &s, n));
        }
        // A table measured on another shape is not applied to this one.
        let other: RoleShapes = [(Role::O, shape(2048, 4096))].into_iter().collect();
        let q = Plan::from_table(&t, &other, &[1], 132);
        assert_eq!(
            q.strategy(Role::O, &other[&Role::O], 1),
            default_strategy(&other[&Role::O], 1, 132)
        );
    }

    #[test]
    fn forcing_a_storage_repicks_the_strategies_for_it() {
        // lm_head measured: raw wins everywhere with one cuBLAS call; tbe3's best at 64 is a
        // chunked decode. A tied model must keep it tbe3 (it is the embedding).
        let mut t = table(vec![entry(Role::LmHead, 64, 100.0, 120.0)]);
        t.entries[0].rows = 128256;
        let s = shape(128256, 4096);
        let shapes: RoleShapes = [(Role::LmHead, s)].into_iter().collect();
        let mut p = Plan::from_table(&t, &shapes, &[64], 132);
        assert_eq!(p.storage(Role::LmHead), Storage::Raw);
        assert_eq!(p.strategy(Role::LmHead, &s, 64), Strategy::BASELINE);
        p.set_storage(Role::LmHead, Storage::Tbe3, &s, 132, Some(&t));
        assert_eq!(p.storage(Role::LmHead), Storage::Tbe3);
        assert_eq!(
            p.strategy(Role::LmHead, &s, 64),
            Strategy::Cublas { chunk_rows: 512 }
        );
        // Unmeasured buckets: the tbe3 defaults, never a whole-matrix decode of 1 GB.
        assert_eq!(p.strategy(Role::LmHead, &s, 128), default_chunked(&s));
        assert!(p.scratch_bytes(&shapes, 256) <= 16 << 20);
    }

    #[test]
    fn a_gemv_entry_never_runs_past_eight_rows() {
        // Prefill chunks of 5 rows use the 8 bucket (GEMV) and run; 300 rows use the 256 entry.
        let s = shape(4096, 4096);
        let mut p = Plan::default_for(&[(Role::Qkv, s)].into_iter().collect(), 132);
        assert!(matches!(
            p.strategy(Role::Qkv, &s, 5),
            Strategy::Gemv { .. }
        ));
        // Force a GEMV entry at the 256 bucket: 300 rows fall back to the chunked decode.
        p.roles
            .get_mut(&Role::Qkv)
            .unwrap()
            .by_bucket
            .insert(256, Strategy::Gemv { ksplit: 1 });
        assert_eq!(p.strategy(Role::Qkv, &s, 300), default_chunked(&s));
        // 16 MiB of 4096-wide BF16 rows: 2048.
        assert_eq!(default_chunked(&s), Strategy::Cublas { chunk_rows: 2048 });
        // Raw storage falls back to the baseline.
        assert_eq!(p.twin().strategy(Role::Qkv, &s, 300), Strategy::BASELINE);
    }

    #[test]
    fn scratch_covers_the_largest_decoded_chunk_and_nothing_when_raw() {
        let shapes: RoleShapes = [
            (Role::Qkv, shape(6144, 4096)),
            (Role::LmHead, shape(128256, 4096)),
        ]
        .into_iter()
        .collect();
        let p = Plan::default_for(&shapes, 132);
        // Batches past 8 decode 2048-row chunks of 4096 BF16: 16 MiB, never the 1 GB lm_head.
        assert_eq!(p.scratch_bytes(&shapes, 64), 16 << 20);
        // Up to 8 rows: GEMV only, no scratch.
        assert_eq!(p.scratch_bytes(&shapes, 8), 0);
        assert_eq!(p.twin().scratch_bytes(&shapes, 64), 0);
        // The 4096-wide embedding is compressed; its twin and the baseline are raw.
        assert_eq!(p.embed, Storage::Tbe3);
        assert_eq!(p.twin().embed, Storage::Raw);
        assert_eq!(Plan::baseline().embed, Storage::Raw);
        // SmolLM2's 576-wide rows: the gather cannot take them, the table stays raw.
        let narrow: RoleShapes = [(Role::LmHead, shape(49152, 576))].into_iter().collect();
        assert_eq!(Plan::default_for(&narrow, 132).embed, Storage::Raw);
        assert_eq!(Plan::baseline().scratch_bytes(&shapes, 64), 0);
    }

    #[test]
    fn tables_round_trip_through_json() {
        let t = table(vec![entry(Role::LmHead, 1, 400.0, 300.0)]);
        let text = serde_json::to_string_pretty(&t).unwrap();
        let back: TuneTable = serde_json::from_str(&text).unwrap();
        assert_eq!(back, t);
        assert!(text.contains("\"kind\": \"gemv\""), "{text}");
    }
}
