//! What a test does when the machine lacks what it needs (root, hugepages, DPDK, a tool CI installs):
//! skip, saying why past the test harness's output capture, or, under `CI=true`, fail with the same
//! reason. CI has all of these, so a skip there would hide a test that never ran.
//!
//! - [`is_root`]: whether this process runs as root.
//! - [`runs_here`]: `true` if the test may go on; otherwise says why it is skipped and returns
//!   `false`, or panics under `CI=true`.
//!
//! The python suites follow the same rule through `skip_unless` in tests/python/harness.py.

use std::io::Write;

/// Whether this process runs as root (effective user id 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `true` when `available`; otherwise prints `SKIPPED {test}: {reason}` on stderr and returns `false`,
/// or panics with the reason when the environment variable `CI` is `true`.
#[track_caller]
pub fn runs_here(available: bool, test: &str, reason: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{test}: {reason} (CI=true: CI must run this, not skip it)");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
    false
}
