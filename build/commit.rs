//! The commit the binary is built from, called from `build.rs` (item 6 there) and reused by
//! tests/cli.rs, which checks `unweight --version` against the checkout.

use std::path::Path;

/// The paths whose contents make the binary: the build is `-dirty` when any differs from the
/// commit, and cargo reruns the build script when any changes.
pub const SOURCES: [&str; 6] = [
    "src",
    "kernels",
    "build.rs",
    "build",
    "Cargo.toml",
    "Cargo.lock",
];

/// `git -C dir ARGS`'s trimmed output, `None` when git is missing or fails (no checkout).
pub fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `HEAD`, with `-dirty` when [`SOURCES`] differ from it; `None` outside a git checkout.
pub fn describe(dir: &Path) -> Option<String> {
    let head = git(dir, &["rev-parse", "HEAD"])?;
    // Untracked files count: a new module is compiled in by a `mod` line before it is added.
    let mut status = vec!["status", "--porcelain", "--untracked-files=normal", "--"];
    status.extend(SOURCES);
    let dirty = git(dir, &status).is_none_or(|s| !s.is_empty());
    Some(if dirty { format!("{head}-dirty") } else { head })
}

/// Tells the crate which commit it is built from (`UNWEIGHT_BUILD_COMMIT`: the commit, with
/// `-dirty` when the sources that make the binary differ from it; empty when there is no git
/// checkout, as in a Docker build context without `.git`), and tells cargo to rerun this script
/// when that may change: a commit or checkout (HEAD, the branch's ref, packed refs) or an edit of
/// those sources.
pub fn build_commit(manifest: &Path) {
    for s in SOURCES {
        println!("cargo:rerun-if-changed={}", manifest.join(s).display());
    }
    let Some(described) = describe(manifest) else {
        println!("cargo:rustc-env=UNWEIGHT_BUILD_COMMIT=");
        return;
    };
    // Paths inside the git directory (a worktree's HEAD is its own, its branch refs are the
    // common directory's: `--git-path` knows which). A path that does not exist is not named:
    // cargo would rerun the script at every build.
    // HEAD's reflog is appended by every commit, checkout and reset, also when the branch's ref
    // is packed (a fresh clone, `git gc`) and its loose file only appears with the commit.
    let mut watched = vec![
        "HEAD".to_string(),
        "logs/HEAD".to_string(),
        "packed-refs".to_string(),
    ];
    if let Some(r) = git(manifest, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(r);
    }
    for w in watched {
        if let Some(p) = git(manifest, &["rev-parse", "--git-path", &w]) {
            let p = manifest.join(p);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    println!("cargo:rustc-env=UNWEIGHT_BUILD_COMMIT={described}");
}
