//! Data-parallel training over PyTorch's own distributed engine (c10d): what `torchrun`
//! + DDP do for the seed's script.
//!
//! - A worker learns its place from torchrun's environment variables (`RANK`,
//!   `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`); `amthal train
//!   --nproc-per-node N` sets them for the N workers it starts (`launch`).
//! - Rank 0 hosts c10d's TCPStore; every rank joins a Gloo process group through it
//!   (`shim`). Gloo sums CPU tensors; CUDA tensors go through the host (NCCL, the GPU
//!   backend, is not built yet).
//! - The training loop (`crate::train`) gives each rank every world-th micro-batch of
//!   an optimizer step's window, normalizes by the whole window's answer tokens, and
//!   sums the gradients across ranks before clipping and the update, so N ranks with
//!   accumulation A compute one process's step with accumulation N x A.

pub mod launch;
pub mod shim;

use anyhow::{Context, Result};
use tch::{Device, Tensor};

use crate::bail_input;
use shim::GlooGroup;

/// Where this worker sits, from torchrun's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlace {
    pub rank: usize,
    pub local_rank: usize,
    pub world: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl WorkerPlace {
    /// From the environment; None when WORLD_SIZE is unset or 1 (a plain run).
    pub fn from_env() -> Result<Option<WorkerPlace>> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<WorkerPlace>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |key: &str, default: Option<&str>| -> Result<usize> {
            let text = get(key).or(default.map(str::to_string)).ok_or_else(|| {
                crate::error::bad_input(format!("WORLD_SIZE is set but {key} is not"))
            })?;
            text.trim()
                .parse()
                .map_err(|_| crate::error::bad_input(format!("{key}={text:?} is not a number")))
        };
        let world: usize = world.trim().parse().map_err(|_| {
            crate::error::bad_input(format!("WORLD_SIZE={world:?} is not a number"))
        })?;
        if world <= 1 {
            return Ok(None);
        }
        let rank = number("RANK", None)?;
        if rank >= world {
            bail_input!("RANK={rank} is not below WORLD_SIZE={world}");
        }
        Ok(Some(WorkerPlace {
            rank,
            local_rank: number("LOCAL_RANK", Some("0"))?,
            world,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: number("MASTER_PORT", Some("29500"))? as u16,
        }))
    }
}

/// This worker's membership of the training group.
pub struct Distributed {
    pub place: WorkerPlace,
    group: GlooGroup,
}

impl Distributed {
    /// Joins the group (waits up to `timeout_s` for every rank).
    pub fn join(place: WorkerPlace, timeout_s: u32) -> Result<Distributed> {
        let group = GlooGroup::join(
            &place.master_addr,
            place.master_port,
            place.rank,
            place.world,
            timeout_s,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "rank {}: joining the group at {}:{}: {e}",
                place.rank,
                place.master_addr,
                place.master_port
            )
        })?;
        Ok(Distributed { place, group })
    }

    pub fn rank(&self) -> usize {
        self.place.rank
    }

    pub fn world(&self) -> usize {
        self.place.world
    }

    /// Sums the tensors across ranks, in place. CUDA tensors are summed through host
    /// copies (Gloo).
    pub fn allreduce_sum(&self, tensors: &[&Tensor]) -> Result<()> {
        self.collective(tensors, None)
    }

    /// ZeRO-1 after an update: every tensor takes its owner's values (`owners[i]` for
    /// `tensors[i]`), one broadcast per owner.
    pub fn broadcast_from_owners(&self, tensors: &[&Tensor], owners: &[usize]) -> Result<()> {
        for root in 0..self.world() {
            let owned: Vec<&Tensor> = tensors
                .iter()
                .zip(owners)
                .filter(|(_, owner)| **owner == root)
                .map(|(t, _)| *t)
                .collect();
            if !owned.is_empty() {
                self.collective(&owned, Some(root))?;
            }
        }
        Ok(())
    }

    fn collective(&self, tensors: &[&Tensor], root: Option<usize>) -> Result<()> {
        let on_host: Vec<Tensor> = tensors
            .iter()
            .map(|t| {
                if t.device() == Device::Cpu {
                    t.shallow_clone()
                } else {
                    t.to_device(Device::Cpu)
                }
            })
            .collect();
        let refs: Vec<&Tensor> = on_host.iter().collect();
        match root {
            None => self.group.allreduce_sum(&refs),
            Some(root) => self.group.broadcast(&refs, root),
        }
        .map_err(|e| anyhow::anyhow!("rank {}: collective: {e}", self.rank()))?;
        for (target, host) in tensors.iter().zip(&on_host) {
            if target.device() != Device::Cpu {
                tch::no_grad(|| target.shallow_clone().copy_(host));
            }
        }
        Ok(())
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<()> {
        self.group
            .barrier()
            .map_err(|e| anyhow::anyhow!("rank {}: barrier: {e}", self.rank()))
    }
}

/// A TCP port that was free a moment ago on the loopback address.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free port for MASTER_PORT")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(vars: &[(&str, &str)]) -> Result<Option<WorkerPlace>> {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorkerPlace::from_lookup(|key| vars.get(key).cloned())
    }

    #[test]
    fn torchrun_variables() {
        assert_eq!(place(&[]).unwrap(), None);
        assert_eq!(place(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let p = place(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((p.rank, p.local_rank, p.world), (3, 1, 4));
        assert_eq!((p.master_addr.as_str(), p.master_port), ("10.0.0.2", 29400));
        assert!(place(&[("WORLD_SIZE", "2")]).is_err());
        assert!(place(&[("WORLD_SIZE", "2"), ("RANK", "2")]).is_err());
        assert!(place(&[("WORLD_SIZE", "two"), ("RANK", "0")]).is_err());
    }
}
