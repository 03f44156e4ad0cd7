//! Choosing the next token from the logits: repetition penalty, frequency and presence
//! penalties, logit bias, then temperature, top-k, top-p, min-p (in that order), then greedy or
//! seeded sampling.

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Validated sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0.0: greedy.
    pub temperature: f32,
    /// 0: disabled.
    pub top_k: u32,
    /// 1.0: disabled.
    pub top_p: f32,
    /// 0.0: disabled.
    pub min_p: f32,
    /// 1.0: disabled.
    pub repetition_penalty: f32,
    /// 0.0: disabled.
    pub frequency_penalty: f32,
    /// 0.0: disabled.
    pub presence_penalty: f32,
    /// (token, bias) added to the logits; tokens distinct and in the vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
}

/// The sampling options of a request, before validation (the WIT `sampling` record).
#[derive(Debug, Clone, Default)]
pub struct Requested {
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

/// The range of `frequency_penalty` and `presence_penalty` (OpenAI's).
pub const PENALTY_RANGE: std::ops::RangeInclusive<f32> = -2.0..=2.0;
/// The range of a logit bias (OpenAI's).
pub const BIAS_RANGE: std::ops::RangeInclusive<f32> = -100.0..=100.0;

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

/// `Ok` when `valid`, else the option `name`'s error with `message()`.
fn check(valid: bool, name: &'static str, message: impl FnOnce() -> String) -> Result<()> {
    if valid {
        Ok(())
    } else {
        Err(Error::invalid_option(name, message()))
    }
}

impl SamplingParams {
    /// Validate the request's values for a model of `vocab_size` tokens; `seed` absent draws
    /// one from `random_seed`.
    pub fn new(r: Requested, vocab_size: u32, random_seed: impl FnOnce() -> u64) -> Result<Self> {
        let temperature = r.temperature.unwrap_or(0.0);
        check(
            temperature.is_finite() && temperature >= 0.0,
            "temperature",
            || format!("temperature must be a finite number >= 0, got {temperature}"),
        )?;
        let top_p = r.top_p.unwrap_or(1.0);
        check(top_p > 0.0 && top_p <= 1.0, "top-p", || {
            format!("top-p must be in (0, 1], got {top_p}")
        })?;
        let min_p = r.min_p.unwrap_or(0.0);
        check((0.0..1.0).contains(&min_p), "min-p", || {
            format!("min-p must be in [0, 1), got {min_p}")
        })?;
        let repetition_penalty = r.repetition_penalty.unwrap_or(1.0);
        check(
            repetition_penalty.is_finite() && repetition_penalty > 0.0,
            "repetition-penalty",
            || format!("repetition-penalty must be a finite number > 0, got {repetition_penalty}"),
        )?;
        let frequency_penalty = r.frequency_penalty.unwrap_or(0.0);
        check(
            PENALTY_RANGE.contains(&frequency_penalty),
            "frequency-penalty",
            || format!("frequency-penalty must be in [-2, 2], got {frequency_penalty}"),
        )?;
        let presence_penalty = r.presence_penalty.unwrap_or(0.0);
        check(
            PENALTY_RANGE.contains(&presence_penalty),
            "presence-penalty",
            || format!("presence-penalty must be in [-2, 2], got {presence_penalty}"),
        )?;
        let mut seen = std::collections::HashSet::new();
        for &(token, bias) in &r.logit_bias {
            check(token < vocab_size, "logit-bias", || {
                format!(
                    "logit-bias: token id {token} is outside the vocabulary (size {vocab_size})"
                )
            })?;
            check(BIAS_RANGE.contains(&bias), "logit-bias", || {
                format!("logit-bias: the bias of token {token} must be in [-100, 100], got {bias}")
            })?;
            check(seen.insert(token), "logit-bias", || {
                format!("logit-bias: token id {token} is listed twice")
            })?;
        }
        let seed = match r.seed {
            Some(s) => s,
            None => random_seed(),
        };
        Ok(SamplingParams {
            temperature,
            top_k: r.top_k.unwrap_or(0),
            top_p,
            min_p,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
            logit_bias: r.logit_bias,
            seed,
        })
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Chooses tokens; holds the PRNG state, the set of tokens seen (for the repetition penalty)
/// and how often each was generated (for the frequency and presence penalties).
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// seen[id]: the token is in the prompt or the output.
    seen: Vec<bool>,
    seen_ids: Vec<u32>,
    /// counts[id]: how many times the token was generated.
    counts: Vec<u32>,
    generated_ids: Vec<u32>,
    /// Scratch buffer of (id, value) candidates.
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Sampler {
            params,
            rng,
            seen: Vec::new(),
            seen_ids: Vec::new(),
            counts: Vec::new(),
            generated_ids: Vec::new(),
            scratch: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Record tokens of the prompt or the output (for the repetition penalty).
    pub fn observe(&mut self, ids: &[u32]) {
        if self.params.repetition_penalty == 1.0 {
            return;
        }
        for &id in ids {
            let i = id as usize;
            if i >= self.seen.len() {
                self.seen.resize(i + 1, false);
            }
            if !self.seen[i] {
                self.seen[i] = true;
                self.seen_ids.push(id);
            }
        }
    }

    /// Record a generated token: for the repetition penalty (as [`Sampler::observe`]) and the
    /// frequency and presence penalties, which count generated tokens only.
    pub fn generated(&mut self, id: u32) {
        self.observe(&[id]);
        if self.params.frequency_penalty == 0.0 && self.params.presence_penalty == 0.0 {
            return;
        }
        let i = id as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        if self.counts[i] == 0 {
            self.generated_ids.push(id);
        }
        self.counts[i] += 1;
    }

    /// Choose the next token. `logits` is modified in place (penalties, bias).
    /// Returns None only for an empty vocabulary.
    pub fn sample(&mut self, logits: &mut [f32]) -> Option<u32> {
        if logits.is_empty() {
            return None;
        }
        // NaN never wins; +inf becomes the largest finite value (keeps the softmax finite).
        for l in logits.iter_mut() {
            let v = *l;
            *l = if v.is_nan() {
                f32::NEG_INFINITY
            } else if v == f32::INFINITY {
                f32::MAX
            } else {
                v
            };
        }
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            for &id in &self.seen_ids {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
                }
            }
        }
        let (frequency, presence) = (self.params.frequency_penalty, self.params.presence_penalty);
        for &id in &self.generated_ids {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= self.counts[id as usize] as f32 * frequency + presence;
            }
        }
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        if self.params.is_greedy() {
            return Some(argmax(logits));
        }
        // Temperature scales the logits; the order is unchanged, so sort on the raw values
        // and scale inside the softmax (in f64: no overflow even for tiny temperatures).
        let inv_t = 1.0 / self.params.temperature as f64;
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        // Sort by descending logit (ties: lower id first), cutting to top-k first when set.
        let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = self.params.top_k as usize;
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, cmp);
            cand.truncate(k);
        }
        cand.sort_unstable_by(cmp);
        // Softmax over the candidates.
        let max = cand[0].1;
        if max == f32::NEG_INFINITY {
            return Some(cand[0].0);
        }
        let mut sum = 0.0f64;
        for c in cand.iter_mut() {
            let p = ((c.1 as f64 - max as f64) * inv_t).exp();
            c.1 = p as f32;
            sum += p;
        }
        for c in cand.iter_mut() {
            c.1 = (c.1 as f64 / sum) as f32;
        }
        // top-p: the smallest prefix whose probability sums to >= p.
        if self.params.top_p < 1.0 {
            let mut acc = 0.0f64;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1 as f64;
                if acc >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        // min-p: relative to the most likely token.
        if self.params.min_p > 0.0 {
            let threshold = cand[0].1 * self.params.min_p;
            let keep = cand.iter().take_while(|c| c.1 >= threshold).count();
            cand.truncate(keep.max(1));
        }
        let total: f64 = cand.iter().map(|c| c.1 as f64).sum();
        let mut r = self.rng.next_f64() * total;
        for c in cand.iter() {
            r -= c.1 as f64;
            if r < 0.0 {
                return Some(c.0);
            }
        }
        cand.last().map(|c| c.0)
    }
}

/// Index of the largest value; the lowest index on ties.
pub fn argmax(xs: &[f32]) -> u32 {
    // The largest value in eight lanes (compares and selects that vectorize: a 262k-entry
    // vocabulary is read once per token), then the first position that holds it.
    const LANES: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    xs.iter().position(|&x| x == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            seed: 1,
            ..Default::default()
        }
    }

    /// How often each token comes out of `n` draws from a sampler with `params` (fresh logits
    /// each draw).
    fn counts(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[s.sample(&mut logits.to_vec()).unwrap() as usize] += 1;
        }
        counts
    }

    fn validate(
        t: Option<f32>,
        p: Option<f32>,
        m: Option<f32>,
        r: Option<f32>,
    ) -> Result<SamplingParams> {
        let r = Requested {
            temperature: t,
            top_p: p,
            min_p: m,
            repetition_penalty: r,
            seed: Some(0),
            ..Default::default()
        };
        SamplingParams::new(r, 10, || 0)
    }

    #[test]
    fn validation() {
        assert!(validate(None, None, None, None).is_ok());
        assert!(validate(Some(0.7), Some(1.0), Some(0.0), Some(1.1)).is_ok());
        for (bad, option) in [
            (validate(Some(-0.1), None, None, None), "temperature"),
            (validate(Some(f32::NAN), None, None, None), "temperature"),
            (
                validate(Some(f32::INFINITY), None, None, None),
                "temperature",
            ),
            (validate(None, Some(0.0), None, None), "top-p"),
            (validate(None, Some(1.01), None, None), "top-p"),
            (validate(None, Some(f32::NAN), None, None), "top-p"),
            (validate(None, None, Some(1.0), None), "min-p"),
            (validate(None, None, Some(-0.5), None), "min-p"),
            (validate(None, None, Some(f32::NAN), None), "min-p"),
            (validate(None, None, None, Some(0.0)), "repetition-penalty"),
            (validate(None, None, None, Some(-1.0)), "repetition-penalty"),
            (
                validate(None, None, None, Some(f32::NAN)),
                "repetition-penalty",
            ),
        ] {
            match bad {
                Err(Error::InvalidOption { name, message }) => {
                    assert_eq!(name, option);
                    assert!(message.starts_with(option), "{message}");
                }
                other => panic!("{option}: {other:?}"),
            }
        }
    }

    #[test]
    fn seed_absent_uses_random_source() {
        let r = Requested {
            temperature: Some(1.0),
            ..Default::default()
        };
        let p = SamplingParams::new(r, 10, || 99).unwrap();
        assert_eq!(p.seed, 99);
    }

    #[test]
    fn greedy_takes_argmax_first_on_ties() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 3.0]), Some(1));
        assert_eq!(s.sample(&mut [f32::NAN, 0.0, -1.0]), Some(1));
        assert_eq!(s.sample(&mut []), None);
        // Past the eight lanes, in the tail, and every value -inf.
        let mut long: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 1000) as f32).collect();
        let best = long.iter().cloned().fold(f32::MIN, f32::max);
        let first = long.iter().position(|&x| x == best).unwrap() as u32;
        assert_eq!(s.sample(&mut long.clone()), Some(first));
        long[1001] = 5000.0;
        assert_eq!(s.sample(&mut long), Some(1001));
        assert_eq!(s.sample(&mut [f32::NEG_INFINITY; 20]), Some(0));
        assert_eq!(s.sample(&mut [-0.0, 0.0, -0.0]), Some(0));
    }

    #[test]
    fn repetition_penalty_hf_style() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        };
        let mut s = Sampler::new(p);
        s.observe(&[0, 1]);
        let mut logits = [4.0, -1.0, 2.5, -3.0];
        // 4.0 / 2 = 2.0 < 2.5 => token 2 wins; -1.0 * 2 = -2.0
        assert_eq!(s.sample(&mut logits), Some(2));
        assert_eq!(logits, [2.0, -2.0, 2.5, -3.0]);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 17) as f32 / 5.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            });
            (0..50)
                .map(|_| s.sample(&mut logits.clone()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..params(5.0)
        };
        assert_eq!(counts(p, &[1.0, 2.0, 0.5, 1.9], 20), [0, 20, 0, 0]);
    }

    #[test]
    fn top_k_restricts_support() {
        let p = SamplingParams {
            top_k: 2,
            ..params(10.0)
        };
        let n = counts(p, &[1.0, 2.0, 0.5, 1.9], 200);
        assert_eq!((n[0], n[2]), (0, 0), "{n:?}");
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probabilities ~ [0.5, 0.3, 0.2] with temperature 1
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let top_p = |top_p| SamplingParams {
            top_p,
            ..params(1.0)
        };
        let seen = counts(top_p(0.75), &logits, 500);
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 0 && seen[1] > 0);
        assert_eq!(counts(top_p(0.4), &logits, 100), [100, 0, 0]);
    }

    #[test]
    fn min_p_drops_unlikely() {
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let p = SamplingParams {
            min_p: 0.2,
            ..params(1.0)
        };
        assert_eq!(counts(p, &logits, 500)[2], 0);
    }

    #[test]
    fn extreme_values_stay_finite() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1e-45,
            ..params(1.0)
        });
        assert_eq!(s.sample(&mut [1.0, 1.5, 1.2]), Some(1));
        let mut s = Sampler::new(params(1.0));
        assert_eq!(
            s.sample(&mut [f32::INFINITY, f32::NEG_INFINITY, f32::NAN]),
            Some(0)
        );
        assert_eq!(
            counts(params(1000.0), &[1.0, 2.0, f32::NEG_INFINITY], 50)[2],
            0
        );
    }

    #[test]
    fn distribution_roughly_matches_softmax() {
        let logits = [0.0f32, 1.0f32.ln() - 0.0, 3.0f32.ln()]; // weights 1,1,3
        let n = counts(params(1.0), &logits, 10_000);
        let f2 = n[2] as f64 / 10_000.0;
        assert!((f2 - 0.6).abs() < 0.03, "{n:?}");
    }

    #[test]
    fn penalty_and_bias_validation() {
        let check = |r: Requested| match SamplingParams::new(r, 10, || 0) {
            Err(Error::InvalidOption { name, message }) => Some((name, message)),
            Err(e) => panic!("{e:?}"),
            Ok(_) => None,
        };
        let bias = |logit_bias: Vec<(u32, f32)>| Requested {
            logit_bias,
            ..Default::default()
        };
        assert_eq!(check(bias(vec![(0, -100.0), (9, 100.0)])), None);
        for (bad, says) in [
            (
                vec![(10, 1.0)],
                "token id 10 is outside the vocabulary (size 10)",
            ),
            (vec![(3, 100.5)], "must be in [-100, 100], got 100.5"),
            (vec![(3, f32::NAN)], "must be in [-100, 100]"),
            (vec![(3, 1.0), (3, 2.0)], "token id 3 is listed twice"),
        ] {
            let (name, message) = check(bias(bad)).unwrap();
            assert_eq!(name, "logit-bias");
            assert!(message.contains(says), "{message}");
        }
        for (f, p, name) in [
            (Some(2.5), None, "frequency-penalty"),
            (None, Some(-2.01), "presence-penalty"),
            (Some(f32::NAN), None, "frequency-penalty"),
        ] {
            let r = Requested {
                frequency_penalty: f,
                presence_penalty: p,
                ..Default::default()
            };
            assert_eq!(check(r).unwrap().0, name);
        }
    }

    #[test]
    fn frequency_and_presence_penalties_count_generated_tokens() {
        let p = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 1.0,
            ..params(0.0)
        };
        let mut s = Sampler::new(p);
        s.observe(&[0, 1, 2]); // the prompt does not count
        s.generated(1);
        s.generated(1);
        s.generated(2);
        let mut logits = [1.0, 3.0, 2.0, 0.0];
        // 1: 3 - 2 * 0.5 - 1 = 1; 2: 2 - 0.5 - 1 = 0.5
        assert_eq!(s.sample(&mut logits), Some(0));
        assert_eq!(logits, [1.0, 1.0, 0.5, 0.0]);
    }

    #[test]
    fn logit_bias_bans_and_forces() {
        let bias = |logit_bias| SamplingParams {
            logit_bias,
            ..params(0.0)
        };
        let logits = [0.5, 4.0, 1.0];
        let mut s = Sampler::new(bias(vec![(1, -100.0)]));
        assert_eq!(s.sample(&mut logits.clone()), Some(2));
        let mut s = Sampler::new(bias(vec![(0, 100.0)]));
        assert_eq!(s.sample(&mut logits.clone()), Some(0));
        // At any temperature, +100 leaves the others no chance.
        let p = SamplingParams {
            temperature: 1.0,
            ..bias(vec![(0, 100.0)])
        };
        assert_eq!(counts(p, &logits, 100), [100, 0, 0]);
    }
}
