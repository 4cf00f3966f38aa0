//! The transformer's building blocks as Burn tensor operations: RMS norm,
//! rotary position embeddings and masked grouped-query attention.

use burn_tensor::{Device, Tensor, TensorData, activation};

use super::attend::{HALF_MAX, HALF_MIN_NORMAL, HALF_SPLIT, HALF_SUBNORMAL_SHIFT};
use super::config::RopeStyle;
use super::rope::Rope;

/// Added to the scores of keys a query must not see (finite, so every backend
/// handles it; `exp` of it is exactly 0).
const MASKED: f32 = -1.0e30;

/// RMS norm over the last dimension, scaled by `weight` (broadcast).
pub(crate) fn rms_norm<const D: usize>(x: Tensor<D>, weight: &Tensor<D>, eps: f32) -> Tensor<D> {
    let mean_sq = x.clone().square().mean_dim(D - 1);
    x * (mean_sq + eps).sqrt().recip() * weight.clone()
}

/// Cosines and sines for a run of positions, shaped to broadcast over heads.
pub(crate) struct RopeTables {
    cos: Tensor<3>,
    sin: Tensor<3>,
}

impl RopeTables {
    /// Tables for `positions` (one row each, in order) rotated by `rope`.
    pub(crate) fn new(
        positions: impl ExactSizeIterator<Item = usize>,
        rope: &Rope<'_>,
        device: &Device,
    ) -> Self {
        let n = positions.len();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        rope.angles(positions, &mut cos, &mut sin);
        let half = rope.pairs();
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, [n, 1, half]), device),
            sin: Tensor::from_data(TensorData::new(sin, [n, 1, half]), device),
        }
    }

    /// Rotates the first `dims` dimensions of each head of `x` (`[n, heads, head_dim]`).
    pub(crate) fn apply(&self, x: Tensor<3>, dims: usize, style: RopeStyle) -> Tensor<3> {
        let [n, heads, head_dim] = x.dims();
        let half = dims / 2;
        let rotating = x.clone().narrow(2, 0, dims);
        let rotated = match style {
            RopeStyle::Halves => {
                let a = rotating.clone().narrow(2, 0, half);
                let b = rotating.narrow(2, half, half);
                let (cos, sin) = (self.cos.clone(), self.sin.clone());
                Tensor::cat(
                    vec![
                        a.clone() * cos.clone() - b.clone() * sin.clone(),
                        a * sin + b * cos,
                    ],
                    2,
                )
            }
            RopeStyle::Interleaved => {
                let pairs: Tensor<4> = rotating.reshape([n, heads, half, 2]);
                let a = pairs.clone().narrow(3, 0, 1);
                let b = pairs.narrow(3, 1, 1);
                let cos: Tensor<4> = self.cos.clone().reshape([n, 1, half, 1]);
                let sin: Tensor<4> = self.sin.clone().reshape([n, 1, half, 1]);
                Tensor::cat(
                    vec![
                        a.clone() * cos.clone() - b.clone() * sin.clone(),
                        a * sin + b * cos,
                    ],
                    3,
                )
                .reshape([n, heads, dims])
            }
        };
        if dims == head_dim {
            rotated
        } else {
            Tensor::cat(vec![rotated, x.narrow(2, dims, head_dim - dims)], 2)
        }
    }
}

/// Which keys each query of a run may attend to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionSpan {
    /// Position of the run's first query.
    pub first_query: usize,
    /// Queries in the run.
    pub queries: usize,
    /// A query at `p` sees keys `p - window + 1..=p` (all earlier keys if `None`).
    pub window: Option<usize>,
}

impl AttentionSpan {
    /// The first key any query of the run can see.
    pub(crate) fn first_key(&self) -> usize {
        match self.window {
            Some(w) => (self.first_query + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// Keys from the first visible one through the last query.
    pub(crate) fn keys(&self) -> usize {
        self.first_query + self.queries - self.first_key()
    }

    /// The additive mask `[1, group * queries, keys]` (rows ordered by group,
    /// then query), or `None` if every query sees every key of the span.
    fn mask(&self, group: usize, device: &Device) -> Option<Tensor<3>> {
        if self.queries == 1 {
            return None;
        }
        let (first_key, keys) = (self.first_key(), self.keys());
        let mut rows = Vec::with_capacity(self.queries * keys);
        for t in 0..self.queries {
            let p = self.first_query + t;
            rows.extend((first_key..first_key + keys).map(|k| {
                let visible = k <= p && self.window.is_none_or(|w| k + w > p);
                if visible { 0.0 } else { MASKED }
            }));
        }
        let mask = Tensor::<2>::from_data(TensorData::new(rows, [self.queries, keys]), device);
        Some(mask.unsqueeze_dim::<3>(0).repeat_dim(0, group).reshape([
            1,
            group * self.queries,
            keys,
        ]))
    }
}

/// Every value rounded to the nearest f16 (kept as f32), saturating at the
/// largest finite one: what the CPU pass's f16 cache stores, computed with
/// the same f32 operations (see [`super::attend::round_to_half`]). On Burn's
/// CPU backend the results are identical; a GPU shader compiler may fuse the
/// operations, so there they can differ in the last bit before rounding.
pub(crate) fn round_to_half(x: Tensor<3>) -> Tensor<3> {
    let x = x.clamp(-HALF_MAX, HALF_MAX);
    let small = x.clone().abs().lower_elem(HALF_MIN_NORMAL);
    let subnormal = (x.clone() + HALF_SUBNORMAL_SHIFT) - HALF_SUBNORMAL_SHIFT;
    let t = x.clone() * HALF_SPLIT;
    let normal = t.clone() - (t - x);
    normal.mask_where(small, subnormal)
}

/// How attention scores are made from query-key products.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scoring {
    /// Multiplies every product.
    pub(crate) scale: f32,
    /// Then squashes it to `(-cap, cap)` by `cap·tanh(s/cap)` (gemma2).
    pub(crate) softcap: Option<f32>,
}

/// Grouped-query attention of `q` (`[n, heads, head_dim]`) over the cached
/// `keys` and `values` (`[kv_heads, span.keys(), head_dim]`); returns `[n, heads * head_dim]`.
pub(crate) fn attention(
    q: Tensor<3>,
    keys: Tensor<3>,
    values: Tensor<3>,
    span: AttentionSpan,
    scoring: Scoring,
) -> Tensor<2> {
    let [n, heads, head_dim] = q.dims();
    let [kv_heads, _, _] = keys.dims();
    let group = heads / kv_heads;
    // Head h uses key/value head h / group: fold the group into the query rows.
    let q: Tensor<3> = q.swap_dims(0, 1).reshape([kv_heads, group * n, head_dim]);
    let mut scores = q.matmul(keys.swap_dims(1, 2)) * scoring.scale;
    if let Some(cap) = scoring.softcap {
        scores = (scores / cap).tanh() * cap;
    }
    if let Some(mask) = span.mask(group, &scores.device()) {
        scores = scores + mask;
    }
    let probs = activation::softmax(scores, 2);
    probs
        .matmul(values)
        .reshape([heads, n, head_dim])
        .swap_dims(0, 1)
        .reshape([n, heads * head_dim])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn read<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().unwrap()
    }

    fn worst(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn rope_rotates_like_the_scalar_definition() {
        let device = Device::flex();
        let (n, heads, hd, first) = (16, 9, 64, 5);
        for (style, dims) in [
            (RopeStyle::Interleaved, 64),
            (RopeStyle::Halves, 64),
            (RopeStyle::Halves, 32),
        ] {
            let x = values(n * heads * hd, 1);
            let tables = RopeTables::new(first..first + n, &Rope::plain(dims, 10_000.0), &device);
            let input = Tensor::<3>::from_data(TensorData::new(x.clone(), [n, heads, hd]), &device);
            let got = read(tables.apply(input, dims, style));
            let mut want = x.clone();
            for t in 0..n {
                for h in 0..heads {
                    let head = &mut want[(t * heads + h) * hd..][..hd];
                    for i in 0..dims / 2 {
                        let theta =
                            (first + t) as f32 * 10_000f32.powf(-2.0 * i as f32 / dims as f32);
                        let (s, c) = theta.sin_cos();
                        let (a, b) = match style {
                            RopeStyle::Halves => (i, i + dims / 2),
                            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        };
                        let (x0, x1) = (head[a], head[b]);
                        head[a] = x0 * c - x1 * s;
                        head[b] = x0 * s + x1 * c;
                    }
                }
            }
            assert!(worst(&got, &want) < 1e-5, "{style:?} {dims}");
        }
    }

    /// The graph rounds keys and values exactly as the CPU pass's cache does.
    #[test]
    fn rounding_to_half_matches_the_cpu_cache() {
        let xs: Vec<f32> = values(4096, 5)
            .iter()
            .enumerate()
            .map(|(i, v)| v * 10f32.powi(i as i32 % 9 - 4))
            .chain([
                70000.0,
                -1e9,
                65504.0,
                0.0,
                3e-5,
                -1e-7,
                6.1e-5,
                2.9802322e-8,
            ])
            .collect();
        let tensor = Tensor::<3>::from_data(
            TensorData::new(xs.clone(), [1, 1, xs.len()]),
            &Device::flex(),
        );
        let got = read(round_to_half(tensor));
        let want: Vec<f32> = xs
            .iter()
            .map(|&x| super::super::attend::round_to_half(x))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn attention_matches_the_scalar_definition() {
        let device = Device::flex();
        let (heads, kv_heads, hd) = (9, 3, 64);
        let group = heads / kv_heads;
        for (first_query, n, window) in [
            (0, 16, None),
            (7, 1, None),
            (10, 12, Some(5)),
            (3, 9, Some(4)),
        ] {
            let span = AttentionSpan {
                first_query,
                queries: n,
                window,
            };
            let (k0, len) = (span.first_key(), span.keys());
            let q = values(n * heads * hd, 2);
            let k = values(kv_heads * len * hd, 3);
            let v = values(kv_heads * len * hd, 4);
            let tensor = |x: &Vec<f32>, shape: [usize; 3]| {
                Tensor::<3>::from_data(TensorData::new(x.clone(), shape), &device)
            };
            let got = read(attention(
                tensor(&q, [n, heads, hd]),
                tensor(&k, [kv_heads, len, hd]),
                tensor(&v, [kv_heads, len, hd]),
                span,
                Scoring {
                    scale: 0.125,
                    softcap: None,
                },
            ));
            let mut want = vec![0f32; n * heads * hd];
            for t in 0..n {
                let p = first_query + t;
                for h in 0..heads {
                    let kv = h / group;
                    let qh = &q[(t * heads + h) * hd..][..hd];
                    let visible: Vec<usize> = (0..len)
                        .filter(|&j| k0 + j <= p && window.is_none_or(|w| k0 + j + w > p))
                        .collect();
                    let scores: Vec<f32> = visible
                        .iter()
                        .map(|&j| {
                            let kj = &k[(kv * len + j) * hd..][..hd];
                            qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * 0.125
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f32::MIN, f32::max);
                    let z: f32 = scores.iter().map(|s| (s - max).exp()).sum();
                    let out = &mut want[(t * heads + h) * hd..][..hd];
                    for (&j, s) in visible.iter().zip(&scores) {
                        let weight = (s - max).exp() / z;
                        for (o, x) in out.iter_mut().zip(&v[(kv * len + j) * hd..][..hd]) {
                            *o += weight * x;
                        }
                    }
                }
            }
            assert!(
                worst(&got, &want) < 1e-4,
                "{first_query} {n} {window:?}: {}",
                worst(&got, &want)
            );
        }
    }
}
