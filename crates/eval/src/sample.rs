//! CPython's `random` module, exactly, for the draws method.md §2 specifies: `random.seed(n)` for an
//! integer, `getrandbits`, `randbelow` and `random.sample` (its pool and set methods). With seed 42 and
//! the paper's order of draws this reproduces the prompt lists of Arditi et al. bit for bit (tested
//! against `../shared/reference/prompts.json`).
//!
//! Pure computation: no I/O, no global state.

/// The Mersenne Twister MT19937 as CPython seeds and uses it.
#[derive(Clone)]
pub struct PyRandom {
    mt: [u32; N],
    index: usize,
}

const N: usize = 624;
const M: usize = 397;

impl PyRandom {
    /// `random.seed(seed)` for an integer seed: `init_by_array` with the 32-bit little-endian words of
    /// `|seed|` (the single word 0 for seed 0).
    pub fn seed(seed: i128) -> PyRandom {
        let mut magnitude = seed.unsigned_abs();
        let mut key = Vec::new();
        while magnitude > 0 {
            key.push(magnitude as u32);
            magnitude >>= 32;
        }
        if key.is_empty() {
            key.push(0);
        }
        PyRandom::init_by_array(&key)
    }

    fn init_genrand(s: u32) -> PyRandom {
        let mut mt = [0u32; N];
        mt[0] = s;
        for i in 1..N {
            mt[i] = 1_812_433_253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        PyRandom { mt, index: N }
    }

    fn init_by_array(key: &[u32]) -> PyRandom {
        let mut r = PyRandom::init_genrand(19_650_218);
        let mt = &mut r.mt;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                mt[0] = mt[N - 1];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        r
    }

    /// `genrand_uint32`: the next tempered 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        if self.index >= N {
            let mt = &mut self.mt;
            for k in 0..N {
                let y = (mt[k] & UPPER) | (mt[(k + 1) % N] & LOWER);
                let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
                mt[k] = mt[(k + M) % N] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `random.getrandbits(k)` for `k <= 64`: 32-bit words from the least significant up, the last one
    /// shifted right to keep its top bits.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!(k <= 64, "getrandbits is implemented for k <= 64 (caller invariant)");
        if k <= 32 {
            return if k == 0 { 0 } else { (self.next_u32() >> (32 - k)) as u64 };
        }
        let low = self.next_u32() as u64;
        let high = (self.next_u32() >> (64 - k)) as u64;
        low | (high << 32)
    }

    /// `random._randbelow(n)` (the getrandbits method): a uniform integer in `0..n`, `n >= 1`.
    pub fn randbelow(&mut self, n: u64) -> u64 {
        assert!(n >= 1, "randbelow needs n >= 1 (caller invariant)");
        let k = 64 - n.leading_zeros();
        let mut r = self.getrandbits(k);
        while r >= n {
            r = self.getrandbits(k);
        }
        r
    }

    /// The indices `random.sample(range(n), k)` returns, in order. Errors (as Python's `ValueError`)
    /// when `k > n`.
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Result<Vec<usize>, String> {
        if k > n {
            return Err(format!("cannot sample {k} of {n}: the sample is larger than the population"));
        }
        let mut setsize = 21usize;
        if k > 5 {
            // `4 ** _ceil(_log(k * 3, 4))`, in floating point as CPython computes it.
            let e = ((k as f64 * 3.0).ln() / 4f64.ln()).ceil() as u32;
            setsize += 4usize.pow(e);
        }
        let mut out = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow((n - i) as u64) as usize;
                out.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n as u64) as usize;
                while !selected.insert(j) {
                    j = self.randbelow(n as u64) as usize;
                }
                out.push(j);
            }
        }
        Ok(out)
    }

    /// `random.sample(population, k)`.
    pub fn sample<T: Clone>(&mut self, population: &[T], k: usize) -> Result<Vec<T>, String> {
        Ok(self.sample_indices(population.len(), k)?.into_iter().map(|i| population[i].clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values printed by CPython 3.11 (`random.seed(...)` then the calls shown).
    #[test]
    fn matches_cpython() {
        let mut r = PyRandom::seed(42);
        let words: Vec<u32> = (0..5).map(|_| r.getrandbits(32) as u32).collect();
        assert_eq!(words, [2746317213, 478163327, 107420369, 3184935163, 1181241943]);
        let mut r = PyRandom::seed(42);
        assert_eq!(r.sample_indices(260, 10).unwrap(), [57, 12, 140, 125, 114, 71, 52, 44, 216, 16]);
        assert_eq!(
            r.sample_indices(18793, 10).unwrap(),
            [976, 3070, 7164, 7623, 16559, 869, 18390, 6515, 17856, 13746]
        );
        let mut r = PyRandom::seed((1i128 << 40) + 5);
        let words: Vec<u32> = (0..3).map(|_| r.getrandbits(32) as u32).collect();
        assert_eq!(words, [2166296868, 2220160828, 1153647273]);
        assert_eq!(r.randbelow(1000), 679);
        assert_eq!(PyRandom::seed(0).getrandbits(32), 3626764237);
        let mut r = PyRandom::seed(7);
        assert_eq!(r.sample(&[0, 1, 2, 3, 4], 5).unwrap(), [2, 1, 3, 0, 4]);
        assert_eq!(r.getrandbits(64), 9885278224986867748);
        assert_eq!(
            PyRandom::seed(1).sample_indices(3, 4).unwrap_err(),
            "cannot sample 4 of 3: the sample is larger than the population"
        );
    }
}
