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
    exp_floor: f64,
    value_floor: f64,
}

/// One tensor's line of a summary: name, original and stored bytes, exponent and whole-value
/// entropy (bits per value, BF16 only), elements.
type Row = (String, u64, u64, Option<f64>, Option<f64>, usize);

fn table(rows: impl Iterator<Item = Row>) {
    let mut groups: BTreeMap<&'static str, Group> = BTreeMap::new();
    let mut total = Group::default();
    for (name, original, stored, h_exp, h_val, numel) in rows {
        let exp_floor = h_exp.map_or(original as f64, |h| numel as f64 * (8.0 + h) / 8.0);
        let value_floor = h_val.map_or(original as f64, |h| numel as f64 * h / 8.0);
        for g in [groups.entry(category(&name)).or_default(), &mut total] {
            g.tensors += 1;
            g.original += original;
            g.stored += stored;
            g.exp_floor += exp_floor;
            g.value_floor += value_floor;
        }
    }
    println!(
        "{:<20} {:>7} {:>12} {:>12} {:>7} {:>9} {:>11}",
        "group", "tensors", "original", "stored", "ratio", "exp floor", "value floor"
    );
    let line = |name: &str, g: &Group| {
        let of = |x: f64| {
            if g.original == 0 {
                1.0
            } else {
                x / g.original as f64
            }
        };
        println!(
            "{:<20} {:>7} {:>12} {:>12} {:>7.4} {:>9.4} {:>11.4}",
            name,
            g.tensors,
            human_bytes(g.original),
            human_bytes(g.stored),
            of(g.stored as f64),
            of(g.exp_floor),
            of(g.value_floor)
        );
    };
    for (name, g) in &groups {
        line(name, g);
    }
    line("total", &total);
}

/// Prints the summary after `compress`: sizes per tensor group, ratio and both entropy floors.
pub fn print_compress(r: &CompressReport) {
    table(r.tensors.iter().zip(&r.stored_bytes).map(|(m, &s)| {
        let numel = m.shape.iter().product();
        (
            m.name.clone(),
            m.original_bytes,
            s,
            m.exponent_entropy_bits,
            m.value_entropy_bits,
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
        "{:<52} {:<16} {:<9} {:>11} {:>11} {:>7} {:>11} {:>7} {:>11}",
        "tensor",
        "shape",
        "encoding",
        "original",
        "stored",
        "H_exp",
        "exp floor",
        "H_value",
        "value floor"
    );
    let num = |x: Option<f64>, digits: usize| x.map_or("-".into(), |h| format!("{h:.digits$}"));
    for t in &r.tensors {
        let shape = format!("{:?}", t.shape);
        println!(
            "{:<52} {:<16} {:<9} {:>11} {:>11} {:>7} {:>11} {:>7} {:>11}",
            t.name,
            shape,
            t.encoding,
            t.original_bytes,
            t.stored_bytes,
            num(t.exponent_entropy_bits, 3),
            num(t.exponent_floor_bytes, 0),
            num(t.value_entropy_bits, 3),
            num(t.value_floor_bytes, 0),
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
            t.value_entropy_bits,
            numel,
        )
    }));
}
