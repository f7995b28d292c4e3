//! How a new LoRA adapter starts (PEFT's `init_lora_weights`):
//! - `true` (PEFT's default): A kaiming-uniform(a = sqrt(5)), B zeros.
//! - `gaussian`: A normal with standard deviation 1 / r, B zeros.
//! - `pissa` (Meng et al. 2024): A and B span the weight's top r singular directions,
//!   B A = U_r S_r V_r^T / scaling, and the base keeps the residual W - scaling B A.
//! - `pissa_niter_K`: the same from torch's randomised `svd_lowrank` (K power
//!   iterations), PEFT's fast form for large models.
//! - `olora` (Büyükakyüz 2024): B and A are the first r columns of Q and rows of R of
//!   the weight's QR decomposition, and the base keeps W - scaling B A.
//!
//! The two residual methods change the base weights, so their adapters only apply to
//! the residual model. What amthal saves is therefore always converted to a plain
//! adapter on the original base, as PEFT's `save_pretrained(...,
//! path_initial_model_for_weight_conversion=...)` converts: W_res + s B A equals
//! W + s (B A minus B0 A0), which is W + s [B | -B0] [A ; A0], an adapter of rank 2r
//! with alpha doubled (sqrt(2) x alpha with rslora), so the scaling stays. A resume splits the saved
//! factors back and takes B0 and A0 from them (no second decomposition, which could
//! differ in sign on another machine). Factorisations run in f32, as PEFT's.

use tch::{Kind, Tensor};

/// PEFT's `init_lora_weights` values amthal builds. In a --config file also PEFT's and
/// axolotl's boolean `true` (the default; `false`, PEFT's random B for tests, is not
/// built).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// PEFT's default (`true`, also `default`): A kaiming-uniform, B zeros.
    #[default]
    Default,
    /// A normal with standard deviation 1 / r, B zeros.
    Gaussian,
    /// The top r singular directions in the adapter, the rest in the base (exact SVD).
    Pissa,
    /// `pissa_niter_K`: PiSSA from torch's randomised `svd_lowrank` with K subspace
    /// iterations (seconds instead of minutes on a 7B; PEFT recommends it for large
    /// models).
    PissaNiter(u32),
    /// The first r columns of Q and rows of R (QR) in the adapter, the rest in the base.
    Olora,
}

const BUILT: &str = "true, gaussian, pissa, pissa_niter_K or olora";

impl std::str::FromStr for LoraInit {
    type Err = String;
    /// PEFT's spellings, in any case.
    fn from_str(text: &str) -> Result<LoraInit, String> {
        let lowered = text.to_ascii_lowercase();
        Ok(match lowered.as_str() {
            "true" | "default" => LoraInit::Default,
            "gaussian" => LoraInit::Gaussian,
            "pissa" => LoraInit::Pissa,
            "olora" => LoraInit::Olora,
            other => match other.strip_prefix("pissa_niter_").map(str::parse::<u32>) {
                Some(Ok(iterations)) => LoraInit::PissaNiter(iterations),
                _ => {
                    return Err(format!(
                        "init_lora_weights '{text}' is not built; {BUILT} are"
                    ));
                }
            },
        })
    }
}

impl std::fmt::Display for LoraInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoraInit::PissaNiter(iterations) => write!(f, "pissa_niter_{iterations}"),
            other => f.write_str(other.name()),
        }
    }
}

impl serde::Serialize for LoraInit {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for LoraInit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Written {
            Flag(bool),
            Name(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Flag(true) => Ok(LoraInit::Default),
            Written::Flag(false) => Err(serde::de::Error::custom(format!(
                "init_lora_weights = false (PEFT's random B, for tests) is not built; {BUILT} are"
            ))),
            Written::Name(name) => name.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl LoraInit {
    /// PEFT's spelling (`init_lora_weights`) of the method; `pissa_niter_K` is "pissa"
    /// here and spelled out by `Display`.
    pub fn name(self) -> &'static str {
        match self {
            LoraInit::Default => "true",
            LoraInit::Gaussian => "gaussian",
            LoraInit::Pissa | LoraInit::PissaNiter(_) => "pissa",
            LoraInit::Olora => "olora",
        }
    }

    /// Whether the base keeps a residual (and saved adapters are converted).
    pub fn changes_the_base(self) -> bool {
        matches!(
            self,
            LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora
        )
    }
}

/// The initial (A [r, in], B [out, r]) of a residual method for `weight` [out, in] in
/// f32, as PEFT's `pissa_init` / `olora_init` compute them.
pub fn residual_factors(init: LoraInit, weight: &Tensor, r: i64, scaling: f64) -> (Tensor, Tensor) {
    let weight = weight.to_kind(Kind::Float);
    match init {
        LoraInit::Pissa => {
            // W = U S V^T: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T (PEFT calls U
            // "V" and V^T "Uh"). torch.svd is linalg_svd with full_matrices = False and
            // the default driver, which tch's linalg_svd cannot leave unset.
            let (u, s, v) = weight.svd(true, true);
            let root = (s.narrow(0, 0, r) / scaling).sqrt();
            let a = root.unsqueeze(1) * v.narrow(1, 0, r).tr();
            let b = u.narrow(1, 0, r) * root.unsqueeze(0);
            (a.contiguous(), b.contiguous())
        }
        LoraInit::PissaNiter(iterations) => {
            // torch.svd_lowrank's random start: [columns of the tall orientation, r].
            let size = weight.size();
            let columns = size[0].min(size[1]);
            let start = Tensor::randn([columns, r], (Kind::Float, weight.device()));
            lowrank_factors(&weight, &start, iterations, scaling)
        }
        LoraInit::Olora => {
            let (q, rr) = Tensor::linalg_qr(&weight, "reduced");
            (
                rr.narrow(0, 0, r).contiguous(),
                q.narrow(1, 0, r).contiguous(),
            )
        }
        LoraInit::Default | LoraInit::Gaussian => {
            unreachable!("{} leaves the base as it is", init.name())
        }
    }
}

/// PiSSA's (A, B) from a randomised SVD that starts at `start` (`svd_lowrank`), as
/// PEFT's `pissa_init` makes them for `pissa_niter_K`.
pub fn lowrank_factors(
    weight: &Tensor,
    start: &Tensor,
    iterations: u32,
    scaling: f64,
) -> (Tensor, Tensor) {
    let (u, s, v) = svd_lowrank(&weight.to_kind(Kind::Float), start, iterations);
    let root = (s / scaling).sqrt();
    let a = root.unsqueeze(1) * v.tr();
    let b = u * root.unsqueeze(0);
    (a.contiguous(), b.contiguous())
}

/// torch.svd_lowrank(W, q, niter) (Halko et al. 2009, algorithm 5.1, as torch writes
/// it) from the random start `start` [min(out, in), q] that torch draws with randn:
/// an orthonormal basis Q of W's range refined by `iterations` power iterations, then
/// the exact SVD of the small Q^T W. Returns (U [out, q], S [q], V [in, q]). A wide W
/// is worked on transposed, as torch does.
pub fn svd_lowrank(weight: &Tensor, start: &Tensor, iterations: u32) -> (Tensor, Tensor, Tensor) {
    let size = weight.size();
    let wide = size[0] < size[1];
    let a = if wide {
        weight.tr()
    } else {
        weight.shallow_clone()
    };
    let orthonormal = |x: &Tensor| Tensor::linalg_qr(x, "reduced").0;
    let mut q = orthonormal(&a.matmul(start));
    for _ in 0..iterations {
        q = orthonormal(&a.tr().matmul(&q));
        q = orthonormal(&a.matmul(&q));
    }
    let small = q.tr().matmul(&a);
    // torch.linalg.svd(B, full_matrices=False) with the default driver (see Pissa).
    let (u, s, v) = small.svd(true, true);
    let u = q.matmul(&u);
    if wide { (v, s, u) } else { (u, s, v) }
}

/// W - scaling B A, stored in `kind` (PEFT's residual weight). Computed in f64 from
/// fresh copies: a resumed run rebuilds the residual from the factors it reads back
/// (views into the saved adapter), and an f32 product of the same values laid out
/// otherwise was seen to round differently (a resume was then not bit-exact, about one
/// run in three); in f64 the product is exact far below f32's rounding.
pub fn residual_weight(
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    kind: Kind,
) -> Tensor {
    let product = b
        .to_kind(Kind::Double)
        .copy()
        .matmul(&a.to_kind(Kind::Double).copy());
    (weight.to_kind(Kind::Double) - product * scaling).to_kind(kind)
}

/// A saved (converted) adapter's factors split into the trained ones and the initial
/// ones: A' = [A ; A0], B' = [B | -B0] (see the module's comment).
pub fn split_converted(a: &Tensor, b: &Tensor, r: i64) -> ((Tensor, Tensor), (Tensor, Tensor)) {
    (
        (a.narrow(0, 0, r), b.narrow(1, 0, r)),
        (a.narrow(0, r, r), -b.narrow(1, r, r)),
    )
}

/// The converted factors of a residual-initialised adapter (see the module's comment).
pub fn converted(a: &Tensor, b: &Tensor, initial: &(Tensor, Tensor)) -> (Tensor, Tensor) {
    let (a0, b0) = initial;
    (
        Tensor::cat(&[a.to_kind(Kind::Float), a0.to_kind(Kind::Float)], 0),
        Tensor::cat(&[b.to_kind(Kind::Float), -b0.to_kind(Kind::Float)], 1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(shape: [i64; 2], phase: f64) -> Tensor {
        (Tensor::arange(shape[0] * shape[1], (Kind::Float, tch::Device::Cpu)) * 0.37 + phase)
            .sin()
            .view(shape)
    }

    /// A --config file may say PEFT's and axolotl's boolean `true`, or a name.
    #[test]
    fn init_lora_weights_reads_true_and_names() {
        let read = |text: &str| serde_json::from_str::<LoraInit>(text);
        assert_eq!(read("true").unwrap(), LoraInit::Default);
        assert_eq!(read("\"true\"").unwrap(), LoraInit::Default);
        assert_eq!(read("\"PiSSA\"").unwrap(), LoraInit::Pissa);
        assert_eq!(read("\"olora\"").unwrap(), LoraInit::Olora);
        assert_eq!(
            read("\"pissa_niter_16\"").unwrap(),
            LoraInit::PissaNiter(16)
        );
        assert!(read("\"pissa_niter_x\"").is_err());
        assert!(read("false").unwrap_err().to_string().contains("not built"));
        assert!(read("\"loftq\"").unwrap_err().to_string().contains("loftq"));
        for init in [
            LoraInit::Default,
            LoraInit::Gaussian,
            LoraInit::Pissa,
            LoraInit::Olora,
            LoraInit::PissaNiter(4),
        ] {
            let written = serde_json::to_string(&init).unwrap();
            assert_eq!(written, format!("\"{init}\""));
            assert_eq!(read(&written).unwrap(), init);
        }
    }

    /// Both residual methods leave the weight unchanged at the start: residual +
    /// scaling B0 A0 = W; and a converted adapter splits back into what it was made of.
    #[test]
    fn residual_plus_adapter_is_the_weight_and_conversion_round_trips() {
        let weight = wave([12, 10], 0.3);
        for init in [LoraInit::Pissa, LoraInit::PissaNiter(2), LoraInit::Olora] {
            let (a0, b0) = residual_factors(init, &weight, 3, 2.0);
            assert_eq!(a0.size(), [3, 10]);
            assert_eq!(b0.size(), [12, 3]);
            let residual = residual_weight(&weight, &a0, &b0, 2.0, Kind::Float);
            let back = &residual + b0.matmul(&a0) * 2.0;
            let error = (back - &weight).abs().max().double_value(&[]);
            assert!(error < 1e-5, "{}: {error}", init.name());
            if init == LoraInit::Pissa {
                // PiSSA's residual keeps the other singular directions: its largest
                // singular value is the weight's (r + 1)-th.
                let (_, of_weight, _) = weight.svd(true, true);
                let (_, of_residual, _) = residual.svd(true, true);
                let (expected, found) =
                    (of_weight.double_value(&[3]), of_residual.double_value(&[0]));
                assert!((expected - found).abs() < 1e-4, "{expected} vs {found}");
            }

            let (a, b) = (wave([3, 10], 1.0), wave([12, 3], 2.0));
            let (a2, b2) = converted(&a, &b, &(a0.shallow_clone(), b0.shallow_clone()));
            assert_eq!((a2.size(), b2.size()), (vec![6, 10], vec![12, 6]));
            // The converted adapter is the change from the start: B A - B0 A0.
            let change = b.matmul(&a) - b0.matmul(&a0);
            assert!(b2.matmul(&a2).allclose(&change, 1e-5, 1e-6, false));
            let ((a1, b1), (a00, b00)) = split_converted(&a2, &b2, 3);
            assert!(a1.equal(&a) && b1.equal(&b) && a00.equal(&a0) && b00.equal(&b0));
        }
    }
}
