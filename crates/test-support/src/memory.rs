//! This process's memory, for tests that bound what a load makes a
//! service (running in the test's process) hold.

/// This process's peak resident memory since the last [`reset_peak_rss`],
/// in bytes (Linux: `VmHWM`).
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Starts [`peak_rss`] again from the current resident memory (writes 5 to
/// `clear_refs`).
pub fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
}
