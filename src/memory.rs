//! glibc's allocator settings for a long-running service with librdkafka in it.
//!
//! librdkafka (C) and this crate both allocate through glibc's malloc. At thousands of
//! subscribed topics, start-up and bursts of deliveries free many small blocks between blocks
//! still in use, and glibc returns none of that to the system by itself: at 1,000 tenants an
//! instance held 35 MiB of RSS (a quarter) in freed memory until `malloc_trim` gave it back
//! (docs/benchmarks.md, Footprint). Hand-written because no crate covers glibc's knobs; the
//! Rust global allocator could be swapped, but librdkafka's allocations would stay with glibc.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often freed memory is given back.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Caps glibc's malloc arenas at two unless `MALLOC_ARENA_MAX` is set. glibc gives threads that
/// allocate at once arenas of their own (up to eight per core), and librdkafka's threads, tokio's
/// workers and the blocking pool all do; memory freed in one arena is not reused by another
/// (10 to 17 MiB of RSS at 8,000 subscribed topics). Call it before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes a malloc parameter.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Gives freed heap memory back to the system every [`TRIM_EVERY`] until `stop`. One call takes
/// a few milliseconds at a heap of 100 MiB.
pub async fn trim_loop(stop: CancellationToken) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TRIM_EVERY) => {}
        }
        // SAFETY: malloc_trim only releases free pages of the allocator's own arenas.
        let _ = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    stop.cancelled().await;
}
