//! Temporary directories, small random numbers and files.

use std::path::{Path, PathBuf};
use std::time::Instant;

/// A directory removed when dropped, unless `ZTM_KEEP_TEST_DIRS` is set or [`TempDir::keep`]
/// was called.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// `$TMPDIR/ztm-test-{tag}-{pid}-{random}`.
    pub fn new(tag: &str) -> Self {
        Self::with_prefix(&format!("ztm-test-{tag}"))
    }

    /// `$TMPDIR/{prefix}-{pid}-{random}`.
    pub fn with_prefix(prefix: &str) -> Self {
        Self::try_with_prefix(prefix).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`TempDir::with_prefix`], with an error instead of a panic.
    pub fn try_with_prefix(prefix: &str) -> anyhow::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("{prefix}-{}-{:x}", std::process::id(), rand_u64()));
        std::fs::create_dir_all(&path)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }

    /// Leaves the directory in place when dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep && std::env::var_os("ZTM_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A number that differs between calls and processes (not for secrets).
pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// A small xorshift generator for junk bytes.
pub struct Rng(u64);

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    pub fn new() -> Rng {
        Rng(rand_u64() | 1)
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Writes `text` to `dir/name` and returns the path as a string.
pub fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    p.to_str().expect("UTF-8 path").to_string()
}
