//! How much memory a run used: the host's peak resident set (VmHWM) and, on CUDA,
//! libtorch's caching-allocator peaks (allocated: what tensors hold, as
//! `torch.cuda.max_memory_allocated`; reserved: what the allocator took from the
//! driver, as `torch.cuda.max_memory_reserved`). Reported by `train`
//! (train_summary.json and the progress line), `evaluate` (the sidecar) and `loss --json`.

use serde::Serialize;
use tch::Device;

use crate::cuda::GpuMemory;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryReport {
    pub peak_rss_bytes: u64,
    /// None on CPU (or when the CUDA shim is unavailable).
    pub gpu: Option<GpuMemory>,
}

impl MemoryReport {
    /// The memory used so far by this process on `device`.
    pub fn now(device: Device) -> MemoryReport {
        MemoryReport {
            peak_rss_bytes: peak_rss_bytes(),
            gpu: match device {
                Device::Cuda(index) => crate::cuda::memory(index),
                _ => None,
            },
        }
    }

    /// "RSS 1.2 GB, GPU 10.3 GB alloc / 11.0 GB reserved (peak)" for progress lines.
    pub fn short(&self) -> String {
        let rss = format!("RSS {:.2} GB", self.peak_rss_bytes as f64 / 1e9);
        match &self.gpu {
            Some(gpu) => format!(
                "{rss}, GPU {:.2} GB alloc / {:.2} GB reserved (peak)",
                gpu.peak_allocated_bytes as f64 / 1e9,
                gpu.peak_reserved_bytes as f64 / 1e9
            ),
            None => rss,
        }
    }
}

/// The process's peak resident set size (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_reports_rss_only() {
        let _buffer = vec![1u8; 8 << 20];
        let report = MemoryReport::now(Device::Cpu);
        assert!(report.peak_rss_bytes > 8 << 20, "{report:?}");
        assert_eq!(report.gpu, None);
        assert!(report.short().starts_with("RSS "));
        let json = serde_json::to_value(report).unwrap();
        assert!(json["gpu"].is_null() && json["peak_rss_bytes"].is_u64());
    }
}
