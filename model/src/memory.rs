//! What a process holds in memory: its resident set, to set beside the bytes of the weights it
//! holds (a process should hold little else: the loaders keep no second copy).

/// This process's resident set in bytes (`VmRSS` of `/proc/self/status`), where Linux says it.
pub fn resident_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: usize = line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Logs the bytes of weights `role` holds in `dtypes` beside the process's resident set.
pub fn log_loaded(role: &str, dtypes: &[&str], weight_bytes: usize) {
    let resident = resident_bytes().unwrap_or(0);
    tracing::info!(
        role,
        held = dtypes.join(","),
        weight_mib = format!("{:.1}", weight_bytes as f64 / 1048576.0),
        resident_mib = format!("{:.1}", resident as f64 / 1048576.0),
        resident_per_weight_byte = format!("{:.3}", resident as f64 / weight_bytes.max(1) as f64),
        "weights loaded"
    );
}

/// The distinct precisions of `weights`, and their bytes.
pub fn summary<'a>(
    weights: impl IntoIterator<Item = &'a kubemoe_kernels::Weight>,
) -> (Vec<&'static str>, usize) {
    let mut names = Vec::new();
    let mut bytes = 0;
    for w in weights {
        names.push(w.dtype().as_str());
        bytes += w.bytes();
    }
    names.sort_unstable();
    names.dedup();
    (names, bytes)
}
