//! `unweight inspect --runtime`: what the `tbe3` runtime form (docs/format.md §6) costs on a
//! checkpoint, per tensor group — GPU bits per weight and escape rate — so the 72%-of-BF16 memory
//! budget and the tile-size choice are checked on real weights, not assumed. Each matrix is
//! loaded (decoded from the stored form when compressed), encoded, decoded again and compared
//! bit for bit with the original.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use safetensors::Dtype;

use super::report::{category, human_bytes};
use crate::codec::runtime::{self, default_tile, Shape, Stats};
use crate::container::Checkpoint;

/// Encodes every 2-D BF16 tensor of `dir` in runtime form with tiles of (at most) `tile` weights
/// and prints per-group sizes and escape rates; fails if any matrix does not round-trip.
pub fn run(dir: &Path, tile: usize) -> Result<()> {
    let ck = Checkpoint::open(dir)?;
    let mut groups: BTreeMap<&'static str, (usize, Stats)> = BTreeMap::new();
    let mut total = Stats::default();
    let (mut load_t, mut enc_t) = (Duration::ZERO, Duration::ZERO);
    for e in ck.entries() {
        if e.dtype != Dtype::BF16 || e.shape.len() != 2 || e.numel() == 0 {
            continue;
        }
        let shape = Shape::new(e.shape[0], e.shape[1], default_tile(e.shape[1], tile))?;
        let t0 = Instant::now();
        let bytes = ck.load_entry(e)?;
        let t1 = Instant::now();
        let rt = runtime::encode_le_bytes(&bytes, shape)
            .with_context(|| format!("encoding {}", e.name))?;
        enc_t += t1.elapsed();
        load_t += t1 - t0;
        let back = runtime::decode(&rt.view()?)?;
        if back
            .iter()
            .zip(bytes.chunks_exact(2))
            .any(|(&b, p)| b != u16::from_le_bytes([p[0], p[1]]))
        {
            bail!("{}: runtime form does not round-trip", e.name);
        }
        ck.release(e);
        let s = rt.stats();
        let g = groups.entry(category(&e.name)).or_default();
        g.0 += 1;
        g.1.add(&s);
        total.add(&s);
    }
    println!(
        "runtime form tbe3 (tile ≤ {tile} weights): {}",
        dir.display()
    );
    println!(
        "{:<20} {:>7} {:>12} {:>12} {:>8} {:>7} {:>8}",
        "group", "tensors", "bf16", "runtime", "bits/w", "ratio", "escapes"
    );
    let line = |name: &str, n: usize, s: &Stats| {
        println!(
            "{:<20} {:>7} {:>12} {:>12} {:>8.3} {:>7.4} {:>7.3}%",
            name,
            n,
            human_bytes(2 * s.elements),
            human_bytes(s.bytes),
            s.bits_per_weight(),
            s.ratio(),
            100.0 * s.escape_rate()
        );
    };
    for (name, (n, s)) in &groups {
        line(name, *n, s);
    }
    line("total", groups.values().map(|g| g.0).sum(), &total);
    println!(
        "all matrices round-trip bit-exact; load {:.2} s, encode {:.2} s ({:.2} GB/s of BF16)",
        load_t.as_secs_f64(),
        enc_t.as_secs_f64(),
        2.0 * total.elements as f64 / enc_t.as_secs_f64().max(1e-9) / 1e9
    );
    Ok(())
}
