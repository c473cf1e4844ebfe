//! `mach_approximate_time` for platforms that are not Apple's.
//!
//! `mlx-rs` seeds its default random state with this Mach call (through the
//! `mach-sys` crate), which only exists on Apple platforms; without a
//! definition, every binary that uses `mlx-rs` fails to link elsewhere.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch: like Mach's clock, a value that differs
/// from run to run, which is all a seed needs.
#[no_mangle]
pub extern "C" fn mach_approximate_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}
