//! Picking the next token from logits: repeat penalty, OpenAI's presence
//! and frequency penalties, then temperature, top-k, top-p and min-p, as
//! llama.cpp's default sampler chain does.

/// Sampling settings. `temperature <= 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set reaching this probability; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens below `min_p` times the top probability; 0 keeps all.
    pub min_p: f32,
    /// Penalty for tokens among the last `repeat_window` ones; 1 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_window: usize,
    /// Subtracted from the logit of every token already generated (OpenAI's
    /// `presence_penalty`); 0 disables.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated
    /// (OpenAI's `frequency_penalty`); 0 disables.
    pub frequency_penalty: f32,
    /// Seed; the same seed and inputs give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_window: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// `seed`, or a fresh random one when none is given.
    pub fn seed_or_random(seed: Option<u64>) -> u64 {
        use std::hash::BuildHasher;
        seed.unwrap_or_else(|| {
            std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
        })
    }
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: u64,
    candidates: Vec<(u32, f32)>,
    /// How often each token was sampled (for the presence and frequency
    /// penalties, which count generated tokens only, as OpenAI's do).
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler with `params`.
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            rng: params.seed ^ 0x9E37_79B9_7F4A_7C15,
            params,
            candidates: Vec::new(),
            counts: Default::default(),
        }
    }

    /// SplitMix64: small, fast and good enough for sampling.
    fn next_unit(&mut self) -> f32 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Picks the next token given `logits` and the tokens so far (`history`).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let token = self.pick(logits, history);
        if self.penalizes_counts() {
            *self.counts.entry(token).or_insert(0) += 1;
        }
        token
    }

    fn penalizes_counts(&self) -> bool {
        self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0
    }

    fn pick(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let counted = self.penalizes_counts();
        let p = &self.params;
        if p.temperature <= 0.0 && p.repeat_penalty == 1.0 && !counted {
            return argmax(logits.iter().copied());
        }
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if p.repeat_penalty != 1.0 {
            // Each distinct recent token once, however often it occurred.
            let mut recent = history[history.len().saturating_sub(p.repeat_window)..].to_vec();
            recent.sort_unstable();
            recent.dedup();
            for id in recent {
                if let Some((_, logit)) = self.candidates.get_mut(id as usize) {
                    *logit = if *logit > 0.0 {
                        *logit / p.repeat_penalty
                    } else {
                        *logit * p.repeat_penalty
                    };
                }
            }
        }
        if counted {
            for (&id, &n) in &self.counts {
                if let Some((_, logit)) = self.candidates.get_mut(id as usize) {
                    *logit -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(self.candidates.iter().map(|&(_, l)| l));
        }
        let c = &mut self.candidates;
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if p.top_k > 0 && p.top_k < c.len() {
            // The k largest in linear time; only they are sorted.
            c.select_nth_unstable_by(p.top_k - 1, by_logit);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit);
        self.finish()
    }

    /// Draws from the candidates, sorted by logit (largest first): softmax
    /// with temperature, then the min-p and top-p cuts.
    fn finish(&mut self) -> u32 {
        let p = &self.params;
        let c = &mut self.candidates;
        // Softmax with temperature.
        let max = c[0].1;
        let mut sum = 0.0;
        for (_, l) in c.iter_mut() {
            *l = ((*l - max) / p.temperature).exp();
            sum += *l;
        }
        for (_, l) in c.iter_mut() {
            *l /= sum;
        }
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p;
            let keep = c
                .iter()
                .take_while(|(_, prob)| *prob >= floor)
                .count()
                .max(1);
            c.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, (_, prob)) in c.iter().enumerate() {
                acc += prob;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        let total: f32 = c.iter().map(|(_, prob)| prob).sum();
        let last = c[c.len() - 1].0;
        let mut r = self.next_unit() * total;
        for &(id, prob) in self.candidates.iter() {
            if r < prob {
                return id;
            }
            r -= prob;
        }
        last
    }
}

/// The index of the first largest value.
pub(super) fn argmax(values: impl Iterator<Item = f32>) -> u32 {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, l) in values.enumerate() {
        if l > best.1 {
            best = (i as u32, l);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_max_and_penalty_changes_it() {
        let logits = [1.0, 3.0, 2.9];
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.5,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[1]), 2);
    }

    /// Presence and frequency penalties count the sampler's own tokens:
    /// a token generated once loses `presence + frequency`, twice `presence
    /// + 2 × frequency`; the prompt (`history`) does not count.
    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens() {
        let logits = [0.0, 3.0, 2.5, 1.4];
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.4,
            frequency_penalty: 0.3,
            ..Default::default()
        });
        // 1 (3.0); 1 at 2.3 < 2.5: 2; 1 at 2.3 > 1.8: 1; 1 at 2.0 > 1.8: 1;
        // 1 at 1.7 < 1.8: 2.
        let picks: Vec<u32> = (0..5).map(|_| s.sample(&logits, &[1, 1, 1])).collect();
        assert_eq!(picks, [1, 2, 1, 1, 2]);
        // Negative penalties favour repeats.
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            presence_penalty: -1.0,
            ..Default::default()
        });
        let logits = [0.0, 3.0, 2.9];
        assert_eq!(s.sample(&logits, &[]), 1);
        assert_eq!(s.sample(&[0.0, 3.0, 3.5], &[]), 1);
    }

    /// Top-k by selection draws exactly what sorting every candidate drew
    /// (distinct logits), with and without a repeat penalty.
    #[test]
    fn top_k_by_selection_matches_a_full_sort() {
        let logits: Vec<f32> = (0..5000u32)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761) >> 8) % 100_000) as f32 / 7919.0 + i as f32 * 1e-6
            })
            .collect();
        let history = [17, 4999, 17, 3, 120_000];
        for (penalty, top_k) in [(1.0, 40), (1.3, 40), (1.3, 1), (1.0, 4999)] {
            let params = SamplingParams {
                temperature: 0.7,
                top_k,
                repeat_penalty: penalty,
                seed: 9,
                ..Default::default()
            };
            let mut sampler = Sampler::new(params.clone());
            let mut reference = Sampler::new(params.clone());
            for _ in 0..50 {
                let got = sampler.sample(&logits, &history);
                // The chain with every candidate sorted first.
                let mut c: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| {
                        let hit = history.contains(&(i as u32));
                        let l = match (hit && penalty != 1.0, l > 0.0) {
                            (false, _) => l,
                            (true, true) => l / penalty,
                            (true, false) => l * penalty,
                        };
                        (i as u32, l)
                    })
                    .collect();
                c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
                c.truncate(top_k);
                reference.candidates = c;
                let want = reference.finish();
                assert_eq!(got, want, "penalty {penalty}, top-k {top_k}");
            }
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_cuts() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32) / 10.0).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 5,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..Default::default()
        };
        let draw = |params: SamplingParams| {
            let mut s = Sampler::new(params);
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(params.clone());
        assert_eq!(a, draw(params.clone()));
        assert!(a.iter().all(|&id| id >= 95), "top-k 5 keeps ids 95..99");
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
            "sampling varies"
        );
        let b = draw(SamplingParams {
            seed: 7,
            ..params.clone()
        });
        assert_ne!(a, b);
        let tight = draw(SamplingParams {
            top_k: 0,
            min_p: 0.95,
            ..params
        });
        assert!(
            tight.iter().all(|&id| id >= 99),
            "min-p 0.95 keeps only the top token here"
        );
    }
}
