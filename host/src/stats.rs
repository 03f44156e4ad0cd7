//! Summary statistics of repeated measurements (bench, `slm logits`).

/// The median of `v`: the middle value, or the mean of the two middle values when there is an
/// even number of them; NaN when `v` is empty (so that a measurement that was not taken reads as
/// missing rather than as 0).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_is_the_middle_or_the_mean_of_the_two_middles() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0]), 5.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![10.0, 20.0]), 15.0);
        assert!(median(vec![]).is_nan());
        // Not sorted by the caller, repeated values.
        assert_eq!(median(vec![7.0, 7.0, 1.0, 9.0, 7.0]), 7.0);
    }
}
