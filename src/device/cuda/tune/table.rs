//! The tuning table on disk: the key a table must match to be used ([`tune_key`], from the
//! device, the driver and a hash of the embedded kernels), its file under the model directory
//! ([`table_path`]), reading and writing it, and the checks that it is usable here and fits the
//! model ([`usable`], [`fits_model`]). CPU-side except [`tune_key`], and unit-tested.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::device::cuda::driver::{self, Context, GpuResult};
use crate::device::cuda::kernels;
use crate::device::cuda::plan::{RoleShapes, TuneKey, TuneTable, TUNE_FORMAT};
use crate::device::DeviceError;

/// Hex xxh3-64 of every embedded fatbin (family name and bytes, in order) and the nvcc version
/// that built them: changes whenever a kernel, its compile flags or the compiler change.
pub fn kernels_hash() -> String {
    let mut h = crate::codec::checksum::Xxh3::new();
    for (family, bytes) in kernels::fatbins() {
        h.update(&(family.len() as u64).to_le_bytes());
        h.update(family.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.update(kernels::nvcc_version().unwrap_or("no nvcc").as_bytes());
    format!("{:016x}", h.digest())
}

/// What a table measured on `ctx`'s device must match to be used there.
pub fn tune_key(ctx: &Context) -> GpuResult<TuneKey> {
    Ok(TuneKey {
        device: driver::device_name(ctx.device())?,
        driver: driver::driver_version()?,
        kernels: kernels_hash(),
        format: TUNE_FORMAT,
    })
}

/// `device` as a file name: characters outside `[A-Za-z0-9._-]` become `_` (an empty name
/// becomes `unknown`).
pub fn sanitize_device(device: &str) -> String {
    let s: String = device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "unknown".into()
    } else {
        s
    }
}

/// Where a model's table for `device` lives: `<model_dir>/tune/<device, sanitized>.json`, so
/// one model directory holds a table per kind of GPU it has been served on.
pub fn table_path(model_dir: &Path, device: &str) -> PathBuf {
    model_dir
        .join("tune")
        .join(format!("{}.json", sanitize_device(device)))
}

/// Reads a tuning table: `Ok(None)` when the file does not exist, an error naming the file when
/// it cannot be read or is not a table.
pub fn read_table(path: &Path) -> Result<Option<TuneTable>, DeviceError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(DeviceError::Invalid(format!(
                "reading tuning table {}: {e}",
                path.display()
            )))
        }
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        DeviceError::Invalid(format!(
            "tuning table {} is not a valid table: {e}",
            path.display()
        ))
    })
}

/// Writes `table` as pretty JSON to `path`, creating its directory; atomically (a temporary
/// file in the same directory, then a rename), so a reader never sees half a table.
pub fn write_table(path: &Path, table: &TuneTable) -> Result<(), DeviceError> {
    use std::io::Write;
    let err = |what: &str, e: std::io::Error| {
        DeviceError::Invalid(format!("{what} tuning table {}: {e}", path.display()))
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err("creating the directory of", e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "table.json".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let text = serde_json::to_string_pretty(table)
        .map_err(|e| DeviceError::Invalid(format!("serialising tuning table: {e}")))?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    };
    if let Err(e) = write().and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err("writing", e));
    }
    Ok(())
}

/// Whether a table measured under `table.key` applies where `key` holds; the error names each
/// field that differs and both values.
pub fn usable(table: &TuneTable, key: &TuneKey) -> Result<(), String> {
    let (t, k) = (&table.key, key);
    let mut diff = Vec::new();
    if t.device != k.device {
        diff.push(format!(
            "device: measured on {:?}, this is {:?}",
            t.device, k.device
        ));
    }
    if t.driver != k.driver {
        diff.push(format!(
            "driver: measured with CUDA {}, this is {}",
            t.driver, k.driver
        ));
    }
    if t.kernels != k.kernels {
        diff.push(format!(
            "kernels: measured with build {}, this is {}",
            t.kernels, k.kernels
        ));
    }
    if t.format != k.format {
        diff.push(format!(
            "format: table format {}, this build reads {}",
            t.format, k.format
        ));
    }
    if diff.is_empty() {
        Ok(())
    } else {
        Err(diff.join("; "))
    }
}

/// Whether every entry of `table` was measured on the shape the model gives its role (a table
/// copied from another model is not used: its entries would all be ignored).
pub fn fits_model(table: &TuneTable, shapes: &RoleShapes) -> Result<(), String> {
    for e in &table.entries {
        match shapes.get(&e.role) {
            Some(s) if s.rows == e.rows && s.cols == e.cols => {}
            Some(s) => {
                return Err(format!(
                    "{:?} was measured as {} × {}, this model's is {} × {}",
                    e.role, e.rows, e.cols, s.rows, s.cols
                ))
            }
            None => return Err(format!("{:?} is not a role of this model", e.role)),
        }
    }
    Ok(())
}

/// `t` as RFC 3339 UTC (`2026-11-27T08:15:02Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
