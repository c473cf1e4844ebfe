//! A team of helper threads that split one piece of host work (a product
//! of `blas::few_rows`, a layer's decode attention) with its caller, and
//! spin between pieces instead of sleeping.
//!
//! A decode step issues about 120 products, a fraction of a millisecond
//! apart, with single-threaded MLX work between them. A helper that goes
//! to sleep between them must be woken for each one, and on the virtual
//! machines this project runs on, waking a thread whose CPU has halted
//! costs tens of microseconds (an inter-processor interrupt through the
//! hypervisor). Measured with rayon's pool, whose workers sleep after a few
//! dozen yields: a batch-1 step took 39 ms against 26 ms with OpenBLAS's
//! spinning threads, and every MLX stage after a product got slower too,
//! since MLX's own thread hand-offs also had to wake a halted CPU. So each
//! helper here spins on its job slot for [`SPIN_FOR`] after its last job,
//! then parks until the next one.
//!
//! One caller at a time uses the team (MLX evaluates on one thread, and
//! host ops run between evaluations); a second concurrent caller finds it
//! busy and does all the work itself.

use std::{
    cell::UnsafeCell,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, OnceLock, TryLockError,
    },
    thread::Thread,
    time::{Duration, Instant},
};

/// How long a helper spins for a new job before it parks: longer than the
/// gaps between the products of one step, short enough that an idle
/// server idles.
const SPIN_FOR: Duration = Duration::from_millis(2);

/// A job: one part of the work, `run(part)`, borrowed from the caller for
/// the duration of [`for_each_part`].
type Work = dyn Fn(usize) + Sync;

/// One helper's slot.
struct Slot {
    /// The number of jobs posted to this helper so far.
    posted: AtomicU64,
    /// The number it has finished.
    done: AtomicU64,
    /// Whether the helper is parked (or about to park).
    parked: AtomicBool,
    /// The job of the latest post: the work and the part to run.
    job: UnsafeCell<Option<(*const Work, usize)>>,
    /// The helper's thread, to unpark it.
    thread: OnceLock<Thread>,
}

// SAFETY: `job` is written only by the caller that holds the team's lock,
// before it publishes `posted` (release), and read only by the helper
// after it sees that post (acquire) and before it publishes `done`; the
// caller does not write it again until it sees `done` (acquire).
unsafe impl Sync for Slot {}

struct Team {
    slots: Vec<Slot>,
    /// Held by the one caller that uses the helpers.
    busy: Mutex<()>,
}

/// The team, started on first use with one helper per core beyond the
/// caller's (none on a single core).
fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let slots = (1..cores)
            .map(|_| Slot {
                posted: AtomicU64::new(0),
                done: AtomicU64::new(0),
                parked: AtomicBool::new(false),
                job: UnsafeCell::new(None),
                thread: OnceLock::new(),
            })
            .collect();
        let team: &'static Team = Box::leak(Box::new(Team {
            slots,
            busy: Mutex::new(()),
        }));
        for (index, slot) in team.slots.iter().enumerate() {
            let spawned = std::thread::Builder::new()
                .name(format!("mlx-helper-{index}"))
                .spawn(move || serve(slot));
            // A helper that could not start is never used (its slot has no
            // thread, which `parts` and `for_each_part` check).
            if let Ok(handle) = spawned {
                let _ = slot.thread.set(handle.thread().clone());
            }
        }
        team
    })
}

/// How many parts a product can be split into now: the caller plus every
/// helper that started.
pub(crate) fn parts() -> usize {
    1 + team()
        .slots
        .iter()
        .filter(|s| s.thread.get().is_some())
        .count()
}

/// Runs `work(0)` on the calling thread and `work(1)` to `work(parts - 1)`
/// on the helpers, and returns when all are done. With the team busy
/// (another caller) or `parts` larger than the team, the caller runs the
/// parts the helpers cannot take itself.
pub(crate) fn for_each_part<'a>(parts: usize, work: &'a (dyn Fn(usize) + Sync + 'a)) {
    let team = team();
    let guard = match team.busy.try_lock() {
        Ok(guard) => Some(guard),
        // A panic elsewhere while holding the lock leaves nothing broken:
        // the slots are consistent between jobs.
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    };
    // SAFETY: the lifetime of `work` is erased for the slots; every post
    // below is waited for before this function returns, so no helper
    // reads it afterwards.
    let erased: *const Work =
        unsafe { std::mem::transmute::<&'a (dyn Fn(usize) + Sync + 'a), &'static Work>(work) };
    let mut posted = Vec::new();
    let mut mine = vec![0];
    for part in 1..parts {
        let slot = guard
            .as_ref()
            .and_then(|_| team.slots.get(part - 1))
            .filter(|s| s.thread.get().is_some());
        let Some(slot) = slot else {
            mine.push(part);
            continue;
        };
        // SAFETY: this caller holds the team's lock and the helper has
        // finished its previous job (every post is waited for), so nothing
        // else reads or writes the slot's job now.
        unsafe { *slot.job.get() = Some((erased, part)) };
        let target = slot.posted.fetch_add(1, Ordering::SeqCst) + 1;
        if slot.parked.load(Ordering::SeqCst) {
            if let Some(thread) = slot.thread.get() {
                thread.unpark();
            }
        }
        posted.push((slot, target));
    }
    for part in mine {
        work(part);
    }
    for (slot, target) in posted {
        while slot.done.load(Ordering::Acquire) < target {
            std::hint::spin_loop();
        }
    }
    drop(guard);
}

/// Bumped by [`rest`]: helpers that see it change park at once.
static REST: AtomicU64 = AtomicU64::new(0);

/// Asks spinning helpers to park now, because other threads need the
/// cores: OpenBLAS's own threads, for the products it still computes (a
/// prefill chunk's), would otherwise share them with spinning helpers.
pub(crate) fn rest() {
    REST.fetch_add(1, Ordering::Relaxed);
}

/// Runs `work(part, slice)` for each of `slices` on the team (as
/// [`for_each_part`]), each part with its own mutable slice: the way to
/// split one output buffer between the threads.
pub(crate) fn for_each_slice<T: Send>(
    slices: Vec<&mut [T]>,
    work: impl Fn(usize, &mut [T]) + Sync,
) {
    // Each part locks only its own slice, so the locks are never contended:
    // they only hand each slice to the one thread that runs its part.
    let slices: Vec<Mutex<&mut [T]>> = slices.into_iter().map(Mutex::new).collect();
    for_each_part(slices.len(), &|part| {
        if let Some(Ok(mut slice)) = slices.get(part).map(|s| s.lock()) {
            work(part, &mut slice);
        }
    });
}

/// A helper's loop: run each posted job, spin for the next one, park when
/// none comes for [`SPIN_FOR`] or when [`rest`] asks.
fn serve(slot: &'static Slot) {
    let mut seen = 0;
    let mut rest_seen = REST.load(Ordering::Relaxed);
    loop {
        let since = Instant::now();
        let mut spins = 0u32;
        loop {
            if slot.posted.load(Ordering::Acquire) > seen {
                break;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            let rest_now = REST.load(Ordering::Relaxed);
            let idle = spins.is_multiple_of(1024) && since.elapsed() > SPIN_FOR;
            if rest_now != rest_seen || idle {
                rest_seen = rest_now;
                slot.parked.store(true, Ordering::SeqCst);
                // A post between the check above and `parked` would not
                // unpark this thread: look once more before parking.
                if slot.posted.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                slot.parked.store(false, Ordering::SeqCst);
            }
        }
        seen += 1;
        // SAFETY: the post for `seen` was published (acquire above) after
        // the job was written, and the caller waits for `done`.
        let job = unsafe { *slot.job.get() };
        if let Some((work, part)) = job {
            // SAFETY: the caller keeps `work` alive until `done` reaches
            // `seen`.
            let work = unsafe { &*work };
            // A panic in a job would leave its caller spinning for ever:
            // stop the process instead (the kernels do not panic).
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(part))).is_err() {
                std::process::abort();
            }
        }
        slot.done.store(seen, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_part_runs_exactly_once() {
        for parts in [1, 2, 3, 7] {
            let counts: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                for_each_part(parts, &|part| {
                    counts[part].fetch_add(1, Ordering::Relaxed);
                });
            }
            for count in &counts {
                assert_eq!(count.load(Ordering::Relaxed), 50, "{parts} parts");
            }
        }
    }

    #[test]
    fn every_slice_reaches_its_own_part() {
        let mut data: Vec<usize> = vec![0; 10];
        let slices: Vec<&mut [usize]> = data.chunks_mut(3).collect();
        for_each_slice(slices, |part, slice| {
            for v in slice.iter_mut() {
                *v += part + 1;
            }
        });
        assert_eq!(data, [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]);
    }

    #[test]
    fn concurrent_callers_each_get_all_their_parts_done() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        for_each_part(parts().max(2), &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 100 * parts().max(2));
    }

    #[test]
    fn a_parked_helper_wakes_for_the_next_job() {
        let ran = AtomicUsize::new(0);
        for_each_part(parts(), &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        // Long enough for every helper to park.
        std::thread::sleep(SPIN_FOR * 3);
        for_each_part(parts(), &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 2 * parts());
    }
}
