//! Log probabilities of the model's distribution at one position: the log-softmax of the raw
//! logits (before penalties, logit bias and temperature, as OpenAI reports them) and the most
//! likely tokens.

/// The most alternatives a request may ask for per position (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A logit as the sampler reads it: NaN never wins, +inf is the largest finite value.
fn clean(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else if l == f32::INFINITY {
        f32::MAX
    } else {
        l
    }
}

/// The largest of `xs` (cleaned); -inf for none.
fn max_of(xs: &[f32]) -> f32 {
    xs.iter()
        .map(|&l| clean(l))
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// The sum of exp(x - max) over `xs` (cleaned), in f64. (The generator is built for size, which
/// leaves loops scalar: a polynomial exp measured no faster than libm's expf here.)
fn sum_exp(xs: &[f32], max: f32) -> f64 {
    xs.iter().map(|&l| (clean(l) - max).exp() as f64).sum()
}

/// One position's log-softmax, computed lazily: the normaliser once, each token on demand.
pub struct Distribution<'a> {
    logits: &'a [f32],
    /// The largest logit, and log(sum(exp(logit - max))): the log-sum-exp is their sum (kept
    /// apart so that huge logits keep their precision).
    max: f64,
    log_sum: f64,
}

impl<'a> Distribution<'a> {
    pub fn new(logits: &'a [f32]) -> Self {
        let max = max_of(logits);
        let log_sum = if max == f32::NEG_INFINITY {
            0.0
        } else {
            sum_exp(logits, max).ln()
        };
        Distribution {
            logits,
            max: max as f64,
            log_sum,
        }
    }

    /// The log probability of token `id` (-inf outside the logits, or when every logit is -inf).
    pub fn logprob(&self, id: u32) -> f32 {
        match self.logits.get(id as usize) {
            Some(&l) if self.max > f64::NEG_INFINITY => {
                let l = clean(l) as f64;
                if l == f64::NEG_INFINITY {
                    f32::NEG_INFINITY
                } else {
                    ((l - self.max) - self.log_sum).min(0.0) as f32
                }
            }
            _ => f32::NEG_INFINITY,
        }
    }

    /// The `n` most likely tokens, most likely first; ties: the lower id first (as greedy
    /// decoding picks).
    pub fn top(&self, n: usize) -> Vec<(u32, f32)> {
        let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
        if n == 0 {
            return top;
        }
        for (i, &l) in self.logits.iter().enumerate() {
            let l = clean(l);
            if top.len() == n && l <= top[n - 1].1 {
                continue;
            }
            // After every entry with a logit >= l: ids come in order, so ties keep the lower first.
            let at = top.partition_point(|&(_, x)| x >= l);
            top.insert(at, (i as u32, l));
            top.truncate(n);
        }
        top.into_iter()
            .map(|(id, _)| (id, self.logprob(id)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_top() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NAN, f32::NEG_INFINITY];
        let d = Distribution::new(&logits);
        let z: f64 = [1.0f64, 3.0, 2.0, 3.0].iter().map(|l| l.exp()).sum();
        for (id, l) in [(0, 1.0f64), (1, 3.0), (2, 2.0)] {
            assert!((d.logprob(id) as f64 - (l - z.ln())).abs() < 1e-6);
        }
        assert_eq!(d.logprob(4), f32::NEG_INFINITY);
        assert_eq!(d.logprob(5), f32::NEG_INFINITY);
        assert_eq!(d.logprob(99), f32::NEG_INFINITY);
        let top = d.top(3);
        assert_eq!(
            top.iter().map(|t| t.0).collect::<Vec<_>>(),
            [1, 3, 2],
            "ties: lower id first"
        );
        assert_eq!(top[0].1, top[1].1);
        assert!(top[1].1 > top[2].1);
        assert!(d.top(0).is_empty());
        assert_eq!(d.top(10).len(), logits.len());
        let total: f64 = (0..6).map(|i| (d.logprob(i) as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn extreme_logits_stay_finite() {
        let d = Distribution::new(&[f32::INFINITY, 0.0, -1e30]);
        assert_eq!(d.logprob(0), 0.0);
        assert!(d.logprob(1) < -1e30);
        let d = Distribution::new(&[f32::NEG_INFINITY; 3]);
        assert_eq!(d.logprob(0), f32::NEG_INFINITY);
        assert_eq!(d.top(1), [(0, f32::NEG_INFINITY)]);
        let d = Distribution::new(&[1e30, 1e30]);
        assert!((d.logprob(1) - (0.5f32).ln()).abs() < 1e-6);
    }
}
