//! Zipf-distributed key ranks for skewed benchmark load: rank `k` (0 is
//! the most popular) is drawn with probability proportional to
//! `1 / (k + 1)^s`, from a precomputed cumulative table (8 bytes a key)
//! and a counter-based random stream, so every run draws the same keys.

/// A Zipf distribution over `0..n`.
#[derive(Debug, Clone)]
pub struct Zipf {
    /// `cdf[k]`: probability of a rank `<= k`.
    cdf: Vec<f64>,
}

/// splitmix64: a well-mixed `u64` from any counter value.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Zipf {
    /// Ranks `0..n` with exponent `s` (`n` at least 1).
    pub fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n.max(1));
        let mut total = 0.0;
        for k in 0..n.max(1) {
            total += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    /// The rank drawn for the `i`th draw of stream `stream`.
    pub fn rank(&self, stream: u64, i: u64) -> usize {
        let r = splitmix(splitmix(stream) ^ i);
        // 53 random bits as a float in [0, 1).
        let u = (r >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }

    /// The probability of rank `k`.
    pub fn probability(&self, k: usize) -> f64 {
        match k {
            0 => self.cdf[0],
            k if k < self.cdf.len() => self.cdf[k] - self.cdf[k - 1],
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_distribution() {
        let z = Zipf::new(1_000_000, 1.1);
        let draws = 200_000u64;
        let top = (0..draws).filter(|&i| z.rank(7, i) == 0).count() as f64 / draws as f64;
        let expected = z.probability(0);
        assert!((0.11..0.14).contains(&expected), "{expected}");
        assert!((top - expected).abs() < 0.01, "{top} vs {expected}");
        let tail = (0..draws).filter(|&i| z.rank(7, i) >= 1000).count();
        assert!(tail > 0, "the tail is drawn too");
    }
}
