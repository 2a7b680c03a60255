//! What a process holds in memory: its resident set, to set beside the bytes of the weights it
//! holds (a process should hold little else: the loaders keep no second copy).

/// This process's resident set in bytes (`VmRSS` of `/proc/self/status`), where Linux says it.
pub fn resident_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: usize = line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of weight matrices held, per precision (`bf16`, `fp8`, …), sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held(pub Vec<(&'static str, usize)>);

impl Held {
    pub fn of<'a>(weights: impl IntoIterator<Item = &'a kubemoe_kernels::Weight>) -> Held {
        Held::sum(weights.into_iter().map(|w| (w.dtype().as_str(), w.bytes())))
    }

    /// The sums per precision of (precision, bytes) pairs, wherever the matrices are held.
    pub fn sum(matrices: impl IntoIterator<Item = (&'static str, usize)>) -> Held {
        let mut held = std::collections::BTreeMap::<&'static str, usize>::new();
        for (dtype, bytes) in matrices {
            *held.entry(dtype).or_default() += bytes;
        }
        Held(held.into_iter().collect())
    }

    pub fn bytes(&self) -> usize {
        self.0.iter().map(|(_, b)| b).sum()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|(name, _)| *name).collect()
    }
}

/// Logs the bytes of weights `role` holds on `device` beside the process's resident set; their
/// ratio only for weights in host memory (a GPU's are not in the resident set).
pub fn log_loaded(role: &str, held: &Held, device: kubemoe_kernels::device::DeviceSpec) {
    let resident = resident_bytes().unwrap_or(0);
    let weight_bytes = held.bytes();
    let (held, weight_mib, resident_mib) = (
        held.names().join(","),
        format!("{:.1}", weight_bytes as f64 / 1048576.0),
        format!("{:.1}", resident as f64 / 1048576.0),
    );
    if device == kubemoe_kernels::device::DeviceSpec::Cpu {
        let per_byte = format!("{:.3}", resident as f64 / weight_bytes.max(1) as f64);
        tracing::info!(
            role,
            held,
            weight_mib,
            resident_mib,
            resident_per_weight_byte = per_byte,
            "weights loaded"
        );
    } else {
        tracing::info!(role, held, %device, weight_mib, host_resident_mib = resident_mib, "weights loaded");
    }
}
