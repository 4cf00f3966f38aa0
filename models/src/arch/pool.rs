//! A small pool of spinning workers for the matrix products.
//!
//! A decode step runs about four products per layer, each a few hundred
//! microseconds of work. Handing them to rayon means its idle workers go to
//! sleep between products and are woken by the kernel for the next one; on
//! two cores that sleep/wake cycle was a sixth of decode time. These workers
//! instead spin for a short while after each job, so the next job starts at
//! once, and only park when the model is idle.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_millis(2);

/// A job: `run(i)` for every task index `i < tasks`.
type Job = *const (dyn Fn(usize) + Sync);

/// What the dispatcher and the workers share.
struct Shared {
    /// Bumped once per job; workers wait for it to change.
    epoch: AtomicU64,
    /// The current job; written before `epoch` is bumped, read after.
    job: Mutex<Option<SendJob>>,
    /// Per participant (the workers, then the caller): its share of the
    /// current job's tasks, [`Share`]-packed.
    shares: Vec<AtomicU64>,
    /// Workers done with the current job.
    finished: AtomicUsize,
    /// A task panicked.
    panicked: AtomicBool,
    /// Per worker: parked (or about to park) and needing an unpark.
    parked: Vec<AtomicBool>,
    /// Set (with an epoch bump) when the pool is dropped: workers exit.
    stop: AtomicBool,
}

/// The job pointer, sent to workers that use it only while the dispatcher
/// waits for them (so the closure behind it is alive).
#[derive(Clone, Copy)]
struct SendJob(Job);

// SAFETY: the pointee is `Sync`, and it is only dereferenced between the
// epoch bump and the worker's `finished` increment, while `run` keeps it alive.
unsafe impl Send for SendJob {}

/// Spinning workers plus the calling thread. Dropping a pool stops and
/// joins its workers.
pub(crate) struct SpinPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// One job at a time (several models may share the pool).
    dispatch: Mutex<()>,
}

thread_local! {
    /// Set on pool workers, and on the caller while it takes a job's tasks,
    /// so a job that itself calls `run` runs inline.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// The process-wide pool's workers, once chosen ([`set_compute_threads`]
/// or the first use).
static GLOBAL_WORKERS: OnceLock<usize> = OnceLock::new();

/// Why the compute threads could not be set.
#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    /// Zero threads.
    #[error("at least one compute thread is needed")]
    Zero,
    /// The pools were already started (a model ran) with another size.
    #[error("the compute threads were already set to {0}; set them before loading a model")]
    AlreadySet(usize),
    /// Rayon's pool could not be built.
    #[error("cannot start the compute threads: {0}")]
    Rayon(#[from] rayon::ThreadPoolBuildError),
}

/// Sizes the forward pass's threads, once, before any model runs:
/// `threads` in all (rayon's pool, and the spinning pool's workers plus the
/// caller). Without a call both use every core.
pub fn set_compute_threads(threads: usize) -> Result<(), ThreadsError> {
    if threads == 0 {
        return Err(ThreadsError::Zero);
    }
    let workers = threads - 1;
    let chosen = *GLOBAL_WORKERS.get_or_init(|| workers);
    if chosen != workers {
        return Err(ThreadsError::AlreadySet(chosen + 1));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    Ok(())
}

impl SpinPool {
    /// The process-wide pool: [`set_compute_threads`] workers, or one fewer
    /// than rayon's thread count (the caller is the last one).
    pub(crate) fn global() -> &'static SpinPool {
        static POOL: OnceLock<SpinPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let workers =
                *GLOBAL_WORKERS.get_or_init(|| rayon::current_num_threads().saturating_sub(1));
            SpinPool::new(workers)
        })
    }

    /// A pool with `workers` threads besides the caller. A worker that
    /// cannot be started leaves a smaller pool (the caller always runs).
    pub(crate) fn new(workers: usize) -> SpinPool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            shares: (0..=workers).map(|_| AtomicU64::new(0)).collect(),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for index in 0..workers {
            let worker_shared = shared.clone();
            let spawned = thread::Builder::new()
                .name(format!("realm-matmul-{index}"))
                .spawn(move || worker(&worker_shared, index));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(_) => break,
            }
        }
        SpinPool {
            shared,
            threads,
            dispatch: Mutex::new(()),
        }
    }

    /// Runs `task(i)` for every `i < tasks`, spread over the workers and the
    /// caller; returns when all are done. A panicking task panics here.
    pub(crate) fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        assert!(tasks <= u32::MAX as usize, "a share's bounds are 32-bit");
        if self.threads.is_empty() || tasks <= 1 || IN_POOL.with(Cell::get) {
            (0..tasks).for_each(task);
            return;
        }
        let _one_job = self.dispatch.lock().unwrap_or_else(|p| p.into_inner());
        let shared = &*self.shared;
        // SAFETY: the lifetime is erased for the workers; they stop using the
        // pointer (finished == workers) before this function returns.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(task) };
        *shared.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(SendJob(job));
        // Contiguous shares: each participant walks its own run of tasks in
        // order (a product's rows stream through one core's caches and
        // prefetchers), then takes from the back of the others'.
        let participants = self.threads.len() + 1;
        for (p, share) in shared.shares.iter().enumerate() {
            let (start, end) = if p < participants {
                (tasks * p / participants, tasks * (p + 1) / participants)
            } else {
                (0, 0)
            };
            share.store(Share::pack(start, end), Ordering::Relaxed);
        }
        shared.finished.store(0, Ordering::Relaxed);
        shared.epoch.fetch_add(1, Ordering::Release);
        for (parked, thread) in shared.parked.iter().zip(&self.threads) {
            if parked.swap(false, Ordering::AcqRel) {
                thread.thread().unpark();
            }
        }
        // A panic here must wait for the workers too: they still use `task`.
        // While the caller takes tasks it is a participant: a task that
        // calls `run` runs its job inline, as on the workers.
        IN_POOL.with(|c| c.set(true));
        let caller = catch_unwind(AssertUnwindSafe(|| {
            take_tasks(shared, self.threads.len(), task)
        }));
        IN_POOL.with(|c| c.set(false));
        let mut spin = Spin::new();
        while shared.finished.load(Ordering::Acquire) < self.threads.len() {
            if !spin.keep_spinning() {
                thread::yield_now();
            }
        }
        *shared.job.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Err(panic) = caller {
            shared.panicked.store(false, Ordering::Release);
            std::panic::resume_unwind(panic);
        }
        if shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a matrix-product task panicked on a pool worker");
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        // No job runs: `run` borrows the pool. Workers see the new epoch,
        // then the flag, and return.
        self.shared.stop.store(true, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::Release);
        for thread in &self.threads {
            thread.thread().unpark();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl SpinPool {
    /// Runs `task(i, piece)` for each `chunk`-long piece `i` of `data` (the
    /// last may be shorter), spread like [`SpinPool::run`].
    pub(crate) fn run_chunks<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        task: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let (len, chunk) = (data.len(), chunk.max(1));
        let base = SharedSlice(data.as_mut_ptr());
        let base = &base;
        self.run(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            let end = (start + chunk).min(len);
            // SAFETY: `run` calls each index once, so pieces never overlap;
            // they lie within `data`, which is borrowed until `run` returns.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), end - start) };
            task(i, piece);
        });
    }
}

/// A slice's start, shared with the tasks that each take a disjoint piece.
struct SharedSlice<T>(*mut T);

// SAFETY: tasks only form disjoint `&mut` pieces of `T: Send` values.
unsafe impl<T: Send> Sync for SharedSlice<T> {}

/// A busy-wait of at most [`SPIN`], reading the clock only now and then.
struct Spin {
    started: Instant,
    rounds: u32,
}

impl Spin {
    fn new() -> Spin {
        Spin {
            started: Instant::now(),
            rounds: 0,
        }
    }

    /// Spins once and says whether to go on (false once [`SPIN`] has passed).
    fn keep_spinning(&mut self) -> bool {
        std::hint::spin_loop();
        self.rounds = self.rounds.wrapping_add(1);
        !self.rounds.is_multiple_of(256) || self.started.elapsed() < SPIN
    }
}

/// A run of task indices `start..end`, packed in a u64 so that its owner
/// (taking from the front) and others (taking from the back) agree.
struct Share;

impl Share {
    fn pack(start: usize, end: usize) -> u64 {
        (start as u64) | ((end as u64) << 32)
    }

    fn unpack(packed: u64) -> (usize, usize) {
        ((packed & 0xFFFF_FFFF) as usize, (packed >> 32) as usize)
    }

    /// Takes the first task of `share` (its owner) or the last (a helper).
    fn take(share: &AtomicU64, front: bool) -> Option<usize> {
        let mut current = share.load(Ordering::Relaxed);
        loop {
            let (start, end) = Share::unpack(current);
            if start >= end {
                return None;
            }
            let (taken, rest) = if front {
                (start, Share::pack(start + 1, end))
            } else {
                (end - 1, Share::pack(start, end - 1))
            };
            match share.compare_exchange_weak(current, rest, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(taken),
                Err(now) => current = now,
            }
        }
    }
}

/// Runs tasks of the current job until none are left: participant `me`'s
/// own share first, front to back, then the others' from their backs.
fn take_tasks(shared: &Shared, me: usize, task: &(dyn Fn(usize) + Sync)) {
    while let Some(i) = Share::take(&shared.shares[me], true) {
        task(i);
    }
    for (p, share) in shared.shares.iter().enumerate() {
        if p != me {
            while let Some(i) = Share::take(share, false) {
                task(i);
            }
        }
    }
}

/// A worker: wait for a new epoch (spinning, then parked), run tasks, report.
fn worker(shared: &Shared, index: usize) {
    IN_POOL.with(|c| c.set(true));
    let mut seen = 0;
    loop {
        let mut spin = Spin::new();
        loop {
            let epoch = shared.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            if spin.keep_spinning() {
                continue;
            }
            // Announce the park, then re-check: a dispatcher that bumped the
            // epoch after our check either sees the flag and unparks us, or
            // we see its epoch here.
            shared.parked[index].store(true, Ordering::Release);
            if shared.epoch.load(Ordering::Acquire) == seen {
                thread::park_timeout(Duration::from_millis(100));
            }
            shared.parked[index].store(false, Ordering::Release);
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let job = shared
            .job
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expect("a job is set before its epoch is published");
        // SAFETY: the dispatcher keeps the closure alive until every worker
        // has counted itself finished for this epoch.
        let task = unsafe { &*job.0 };
        if catch_unwind(AssertUnwindSafe(|| take_tasks(shared, index, task))).is_err() {
            shared.panicked.store(true, Ordering::Release);
        }
        shared.finished.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        let pool = SpinPool::new(2);
        for tasks in [0, 1, 2, 7, 64] {
            for _ in 0..50 {
                let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(tasks, &|i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
    }

    /// A task that runs a job of its own runs it inline, on whichever
    /// thread took the task (the caller included), and the caller dispatches
    /// normally afterwards.
    #[test]
    fn jobs_inside_tasks_run_inline() {
        let pool = SpinPool::new(1);
        let counts: Vec<AtomicUsize> = (0..4 * 3).map(|_| AtomicUsize::new(0)).collect();
        pool.run(4, &|i| {
            pool.run(3, &|j| {
                counts[3 * i + j].fetch_add(1, Ordering::Relaxed);
            });
        });
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        assert!(!IN_POOL.with(Cell::get));
    }

    #[test]
    fn dropping_the_pool_stops_its_workers() {
        let pool = SpinPool::new(2);
        pool.run(8, &|_| {});
        // One worker spinning, one parked, or both: either way they exit.
        thread::sleep(SPIN * 3);
        let shared = pool.shared.clone();
        drop(pool);
        assert_eq!(Arc::strong_count(&shared), 1, "the workers let go");
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        let pool = SpinPool::new(1);
        for (len, chunk) in [(0, 4), (1, 4), (10, 3), (64, 8)] {
            let mut data = vec![0usize; len];
            pool.run_chunks(&mut data, chunk, &|i, piece| {
                piece.iter_mut().for_each(|v| *v += i + 1);
            });
            let want: Vec<usize> = (0..len).map(|k| k / chunk + 1).collect();
            assert_eq!(data, want);
        }
    }

    #[test]
    fn idle_workers_park_and_wake_for_the_next_job() {
        let pool = SpinPool::new(1);
        thread::sleep(SPIN * 3);
        let sum = AtomicUsize::new(0);
        pool.run(10, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 45);
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_survives() {
        let pool = SpinPool::new(1);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|i| assert!(i != 5, "task 5 fails"));
        }));
        assert!(result.is_err());
        let ran = AtomicUsize::new(0);
        pool.run(8, &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 8);
    }
}
