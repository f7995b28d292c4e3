//! Data-parallel training over PyTorch's own distributed engine (c10d): what `torchrun`
//! + DDP do for the seed's script.
//!
//! - A worker learns its place from torchrun's environment variables (`RANK`,
//!   `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`); `amthal train
//!   --nproc-per-node N` sets them for the N workers it starts (`launch`).
//! - Rank 0 hosts c10d's TCPStore; every rank joins a process group through it
//!   (`shim`): NCCL when training on CUDA (sums on the cards), Gloo on the CPU (and on
//!   CUDA with `--dist-backend gloo`, through host copies), as torchrun + DDP choose.
//! - The training loop (`crate::train`) gives each rank every world-th micro-batch of
//!   an optimizer step's window, normalizes by the whole window's answer tokens, and
//!   sums the gradients across ranks before clipping and the update, so N ranks with
//!   accumulation A compute one process's step with accumulation N x A.

pub mod launch;
pub mod shim;

use anyhow::{Context, Result};
use tch::{Device, Tensor};

use crate::bail_input;
pub use shim::Backend;
use shim::ProcessGroup;

/// `--dist-backend`: which c10d backend a data-parallel run uses.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DistBackend {
    /// NCCL when the run trains on CUDA, else Gloo (torch.distributed's choice).
    #[default]
    Auto,
    Gloo,
    Nccl,
}

impl DistBackend {
    /// The backend for a run on `device`; NCCL on the CPU is an input error.
    pub fn resolve(self, device: Device) -> Result<Backend> {
        match (self, device) {
            (DistBackend::Gloo, _) | (DistBackend::Auto, Device::Cpu) => Ok(Backend::Gloo),
            (DistBackend::Nccl | DistBackend::Auto, Device::Cuda(_)) => Ok(Backend::Nccl),
            (DistBackend::Nccl, other) => {
                bail_input!("--dist-backend nccl sums CUDA tensors; this run trains on {other:?}")
            }
            (DistBackend::Auto, other) => {
                bail_input!("data-parallel training on {other:?} is not supported (cpu or cuda)")
            }
        }
    }
}

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
    /// From the environment; None when WORLD_SIZE is unset (a plain run). WORLD_SIZE=1
    /// (`torchrun --nproc-per-node 1`) is a group of one, as DDP makes it.
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
        if world == 0 {
            bail_input!("WORLD_SIZE=0: a run needs at least one rank");
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
    group: ProcessGroup,
    /// Where the backend's collectives read their tensors: the CPU for Gloo, the
    /// worker's card for NCCL. Tensors elsewhere are copied there and back.
    staging: Device,
}

impl Distributed {
    /// Joins the group (waits up to `timeout_s` for every rank). `device`: where this
    /// worker trains (NCCL runs on that card).
    pub fn join(
        place: WorkerPlace,
        backend: Backend,
        device: Device,
        timeout_s: u32,
    ) -> Result<Distributed> {
        let staging = match (backend, device) {
            (Backend::Nccl, Device::Cuda(_)) => device,
            (Backend::Nccl, other) => {
                bail_input!("the NCCL backend needs a CUDA device, not {other:?}")
            }
            (Backend::Gloo, _) => Device::Cpu,
        };
        let cuda_device = match device {
            Device::Cuda(index) => index,
            _ => 0,
        };
        let group = ProcessGroup::join(
            &place.master_addr,
            place.master_port,
            place.rank,
            place.world,
            timeout_s,
            backend,
            cuda_device,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "rank {}: joining the group at {}:{}: {e}",
                place.rank,
                place.master_addr,
                place.master_port
            )
        })?;
        Ok(Distributed {
            place,
            group,
            staging,
        })
    }

    pub fn backend(&self) -> Backend {
        self.group.backend
    }

    pub fn rank(&self) -> usize {
        self.place.rank
    }

    pub fn world(&self) -> usize {
        self.place.world
    }

    /// Sums the tensors across ranks, in place. Under Gloo CUDA tensors are summed
    /// through host copies; under NCCL, on the card (and CPU tensors through it).
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
        self.start(tensors, root)?.finish()
    }

    /// Starts summing the tensors across ranks and returns while the backend works
    /// (DDP's overlap of the all-reduce with the rest of the backward pass). The
    /// tensors must be neither read nor written until `Pending::finish`: small ones
    /// are summed in a flat copy that `finish` writes back, large contiguous ones
    /// where they are (csrc/distributed.cpp). Every rank must start the same sums in
    /// the same order.
    pub fn start_sum(&self, tensors: &[&Tensor]) -> Result<Pending> {
        self.start(tensors, None)
    }

    fn start(&self, tensors: &[&Tensor], root: Option<usize>) -> Result<Pending> {
        let targets: Vec<Tensor> = tensors.iter().map(|t| t.shallow_clone()).collect();
        let staged: Vec<Tensor> = tensors
            .iter()
            .map(|t| {
                if t.device() == self.staging {
                    t.shallow_clone()
                } else {
                    t.to_device(self.staging)
                }
            })
            .collect();
        let refs: Vec<&Tensor> = staged.iter().collect();
        let in_flight = self
            .group
            .start(&refs, root)
            .map_err(|e| anyhow::anyhow!("rank {}: collective: {e}", self.rank()))?;
        Ok(Pending {
            in_flight,
            targets,
            staged,
            rank: self.rank(),
        })
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<()> {
        self.group
            .barrier()
            .map_err(|e| anyhow::anyhow!("rank {}: barrier: {e}", self.rank()))
    }
}

/// A collective under way (`Distributed::start_sum`).
#[must_use = "a started collective must be finished"]
pub struct Pending {
    in_flight: shim::InFlight,
    /// The tensors the results go to, and the copies the backend works on where they
    /// live elsewhere (CUDA tensors under Gloo); the same tensors otherwise.
    targets: Vec<Tensor>,
    staged: Vec<Tensor>,
    rank: usize,
}

impl Pending {
    /// Waits for the collective and writes its results into the tensors.
    pub fn finish(self) -> Result<()> {
        self.in_flight
            .finish()
            .map_err(|e| anyhow::anyhow!("rank {}: collective: {e}", self.rank))?;
        for (target, staged) in self.targets.iter().zip(&self.staged) {
            if target.device() != staged.device() {
                tch::no_grad(|| target.shallow_clone().copy_(staged));
            }
        }
        Ok(())
    }
}

/// A TCP port that was free a moment ago on the loopback address.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free port for MASTER_PORT")?;
    Ok(listener.local_addr()?.port())
}

/// Tests: runs `body(rank, group)` on two ranks of a Gloo group (threads on the
/// loopback address) and returns each rank's result, in rank order.
#[cfg(test)]
pub(crate) fn on_two_gloo_ranks<T, F>(body: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize, Distributed) -> T + Send + Clone + 'static,
{
    let port = free_port().unwrap();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let body = body.clone();
            std::thread::spawn(move || {
                let place = WorkerPlace {
                    rank,
                    local_rank: rank,
                    world: 2,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                };
                body(
                    rank,
                    Distributed::join(place, Backend::Gloo, Device::Cpu, 30).unwrap(),
                )
            })
        })
        .collect();
    ranks.into_iter().map(|rank| rank.join().unwrap()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

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
        let alone = place(&[("WORLD_SIZE", "1"), ("RANK", "0")])
            .unwrap()
            .unwrap();
        assert_eq!((alone.rank, alone.world, alone.master_port), (0, 1, 29500));
        assert!(place(&[("WORLD_SIZE", "0"), ("RANK", "0")]).is_err());
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

    /// Two ranks (threads, Gloo): small tensors (bucketed), a large contiguous one
    /// (over the 32 MB bucket size: summed where it is, no copy) and a large
    /// non-contiguous one (bucketed) all end as the element-wise sums; a broadcast of
    /// a large tensor gives every rank the root's values.
    #[test]
    fn large_tensors_are_summed_where_they_are() {
        let large = 9 << 20; // f32 values: 36 MB
        // n values repeating 0..1000, times `scale`.
        let pattern = |n: i64, scale: f64| {
            Tensor::arange(n, (Kind::Float, Device::Cpu)).remainder(1000.0) * scale
        };
        on_two_gloo_ranks(move |rank, group| {
            let values = |n: i64, scale: f64| pattern(n, scale * (rank + 1) as f64);
            let small = values(10, 1.0);
            let contiguous = values(large, 0.5);
            let transposed = values(large, 0.25).view([3 << 10, 3 << 10]).transpose(0, 1);
            let pending = group
                .start_sum(&[&small, &contiguous, &transposed])
                .unwrap();
            pending.finish().unwrap();
            // The sum of rank 0's and rank 1's values: 1 + 2 times the pattern.
            let expect = |n: i64, scale: f64| pattern(n, scale * 3.0);
            assert!(small.equal(&expect(10, 1.0)));
            assert!(contiguous.equal(&expect(large, 0.5)));
            let transposed_expect = expect(large, 0.25).view([3 << 10, 3 << 10]).transpose(0, 1);
            assert!(transposed.equal(&transposed_expect));
            let broadcast = values(large, 1.0);
            group.broadcast_from_owners(&[&broadcast], &[1]).unwrap();
            assert!(broadcast.equal(&pattern(large, 2.0)), "rank 1's values");
        });
    }

    #[test]
    fn backend_follows_the_device() {
        let cuda = Device::Cuda(1);
        assert_eq!(
            DistBackend::Auto.resolve(Device::Cpu).unwrap(),
            Backend::Gloo
        );
        assert_eq!(DistBackend::Auto.resolve(cuda).unwrap(), Backend::Nccl);
        assert_eq!(DistBackend::Gloo.resolve(cuda).unwrap(), Backend::Gloo);
        assert_eq!(DistBackend::Nccl.resolve(cuda).unwrap(), Backend::Nccl);
        let error = DistBackend::Nccl
            .resolve(Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(error.contains("CUDA tensors"), "{error}");
    }
}
