//! Human-readable tables for the CLI's reports.

use std::collections::BTreeMap;

use crate::container::{CompressReport, InspectReport};

/// Formats a byte count with a binary unit.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// The group a Llama tensor belongs to in summaries.
pub fn category(name: &str) -> &'static str {
    if name.contains("embed_tokens") {
        "embedding"
    } else if name.contains("lm_head") {
        "lm_head"
    } else if name.contains("self_attn") {
        "attention q/k/v/o"
    } else if name.contains("mlp") {
        "mlp gate/up/down"
    } else if name.contains("norm") {
        "norms"
    } else {
        "other"
    }
}

#[derive(Default)]
struct Group {
    tensors: usize,
    original: u64,
    stored: u64,
    floor: f64,
}

fn table(rows: impl Iterator<Item = (String, u64, u64, Option<f64>, usize)>) {
    let mut groups: BTreeMap<&'static str, Group> = BTreeMap::new();
    let mut total = Group::default();
    for (name, original, stored, entropy, numel) in rows {
        let floor = entropy.map_or(original as f64, |h| numel as f64 * (8.0 + h) / 8.0);
        for g in [groups.entry(category(&name)).or_default(), &mut total] {
            g.tensors += 1;
            g.original += original;
            g.stored += stored;
            g.floor += floor;
        }
    }
    println!(
        "{:<20} {:>7} {:>12} {:>12} {:>7} {:>7}",
        "group", "tensors", "original", "stored", "ratio", "floor"
    );
    let line = |name: &str, g: &Group| {
        let ratio = if g.original == 0 {
            1.0
        } else {
            g.stored as f64 / g.original as f64
        };
        let floor = if g.original == 0 {
            1.0
        } else {
            g.floor / g.original as f64
        };
        println!(
            "{:<20} {:>7} {:>12} {:>12} {:>7.4} {:>7.4}",
            name,
            g.tensors,
            human_bytes(g.original),
            human_bytes(g.stored),
            ratio,
            floor
        );
    };
    for (name, g) in &groups {
        line(name, g);
    }
    line("total", &total);
}

/// Prints the summary after `compress`: sizes per tensor group, ratio and the entropy floor.
pub fn print_compress(r: &CompressReport) {
    table(r.tensors.iter().zip(&r.stored_bytes).map(|(m, &s)| {
        let numel = m.shape.iter().product();
        (
            m.name.clone(),
            m.original_bytes,
            s,
            m.exponent_entropy_bits,
            numel,
        )
    }));
    let original: u64 = r.tensors.iter().map(|m| m.original_bytes).sum();
    println!(
        "compressed {} tensors in {:.1} s ({:.2} GB/s) into {}",
        r.tensors.len(),
        r.elapsed.as_secs_f64(),
        original as f64 / r.elapsed.as_secs_f64().max(1e-9) / 1e9,
        r.output.display()
    );
    if !r.copied.is_empty() {
        println!("copied: {}", r.copied.join(", "));
    }
    if !r.skipped.is_empty() {
        println!("not carried over: {}", r.skipped.join(", "));
    }
}

/// Prints `inspect` as a per-tensor table followed by the group summary.
pub fn print_inspect(r: &InspectReport) {
    println!(
        "{:<52} {:<16} {:<9} {:>11} {:>11} {:>7} {:>11}",
        "tensor", "shape", "encoding", "original", "stored", "H_exp", "floor"
    );
    for t in &r.tensors {
        let shape = format!("{:?}", t.shape);
        println!(
            "{:<52} {:<16} {:<9} {:>11} {:>11} {:>7} {:>11}",
            t.name,
            shape,
            t.encoding,
            t.original_bytes,
            t.stored_bytes,
            t.exponent_entropy_bits
                .map_or("-".into(), |h| format!("{h:.3}")),
            t.floor_bytes.map_or("-".into(), |f| format!("{f:.0}"))
        );
    }
    println!();
    table(r.tensors.iter().map(|t| {
        let numel = t.shape.iter().product();
        (
            t.name.clone(),
            t.original_bytes,
            t.stored_bytes,
            t.exponent_entropy_bits,
            numel,
        )
    }));
}
