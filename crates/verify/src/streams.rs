//! Two jobs at once, each on its own half of the threads, reporting to one progress display.
//!
//! verify's work is two independent streams (the original's completions, the compared run's), and a
//! generation step is too small a product to keep two threads busy without waiting on each other at
//! every matrix: two streams on a thread each are not. Every result is the same bits whatever the
//! threads (the runtime's promise), so running them at once changes nothing but the time.

use std::sync::mpsc;

use crate::measure::Progress;

/// A job's handle on the shared progress display.
pub struct Tick(mpsc::Sender<usize>);

impl Tick {
    /// A callback for one loop that reports its count done so far (cumulative, as `eval` reports it).
    pub fn counter(&self) -> impl FnMut(usize) + '_ {
        let mut last = 0;
        move |done| {
            // The receiver lives until both jobs have ended, so sending cannot fail.
            let _ = self.0.send(done.saturating_sub(last));
            last = done;
        }
    }
}

/// Runs `a` and `b` at once, each on half of the current thread pool's threads (at least one each; one
/// after the other where the pool has one thread), while this thread shows their progress as one
/// stage of `total` items.
pub fn two<A: Send, B: Send>(
    progress: &mut dyn Progress,
    stage: &str,
    total: usize,
    a: impl FnOnce(&Tick) -> A + Send,
    b: impl FnOnce(&Tick) -> B + Send,
) -> (A, B) {
    progress.stage(stage, total);
    let threads = rayon::current_num_threads();
    let pool = |n: usize| rayon::ThreadPoolBuilder::new().num_threads(n).build().ok();
    let pools = if threads >= 2 { pool(threads / 2).zip(pool(threads - threads / 2)) } else { None };
    let (tx, rx) = mpsc::channel();
    let (ta, tb) = (Tick(tx.clone()), Tick(tx));
    // Relays the jobs' counts until both have ended (and dropped their ticks).
    let relay = |progress: &mut dyn Progress| {
        let mut done = 0;
        for n in rx {
            done += n;
            progress.advance(done);
        }
    };
    std::thread::scope(|s| match &pools {
        Some((pa, pb)) => {
            let ha = s.spawn(move || pa.install(|| a(&ta)));
            let hb = s.spawn(move || pb.install(|| b(&tb)));
            relay(progress);
            (join(ha), join(hb))
        }
        None => {
            // One thread (or no pool could be built): the jobs in order, on a one-thread pool like the caller's.
            let one = pool(1);
            let h = s.spawn(move || {
                let both = || {
                    let ra = a(&ta);
                    drop(ta);
                    (ra, b(&tb))
                };
                match &one {
                    Some(p) => p.install(both),
                    None => both(),
                }
            });
            relay(progress);
            join(h)
        }
    })
}

/// A job's result; a panic in it goes on in this thread.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the display was told.
    #[derive(Default)]
    struct Seen(Vec<(String, usize)>, Vec<usize>);
    impl Progress for Seen {
        fn stage(&mut self, name: &str, total: usize) {
            self.0.push((name.to_string(), total));
        }
        fn advance(&mut self, done: usize) {
            self.1.push(done);
        }
    }

    /// Both jobs run (on one thread or two), their results come back in order, and the display counts
    /// every item of both, rising to the total.
    #[test]
    fn both_jobs_run_and_their_counts_add_up() {
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut seen = Seen::default();
            let (a, b) = pool.install(|| {
                two(
                    &mut seen,
                    "jobs",
                    7,
                    |t: &Tick| {
                        let mut c = t.counter();
                        (1..=3).for_each(&mut c);
                        ("a", rayon::current_num_threads())
                    },
                    |t: &Tick| {
                        let mut c = t.counter();
                        [2, 4].into_iter().for_each(&mut c);
                        ("b", rayon::current_num_threads())
                    },
                )
            });
            assert_eq!((a.0, b.0), ("a", "b"));
            let halves = if threads >= 2 { (threads / 2, threads - threads / 2) } else { (1, 1) };
            assert_eq!((a.1, b.1), halves, "{threads} threads");
            assert_eq!(seen.0, vec![("jobs".to_string(), 7)]);
            assert_eq!(seen.1.last(), Some(&7), "{threads} threads: {:?}", seen.1);
            assert!(seen.1.windows(2).all(|w| w[0] <= w[1]));
        }
    }
}
