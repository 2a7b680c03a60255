//! When a kernel splits its work across rayon's pool, and where a forward step runs.
//!
//! A product splits its panels across the pool once it is large enough ([`may_split`]), but
//! never inside another split's task ([`task`]): the grouped expert FFN runs experts in
//! parallel, and each expert's products stay on its thread.
//!
//! A forward step runs on one of the pool's threads ([`step`]): its splits then fork and join
//! inside the pool, where the thread that waits helps with the work and an idle worker still
//! spinning takes its half without a wake-up. From a thread outside the pool every split
//! would hand off twice through the kernel (the caller sleeps and a worker is woken, then the
//! reverse), tens of microseconds on these machines, tens of times per decode token.

use std::cell::Cell;

thread_local! {
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Whether work started here may split across the pool: not inside a split's task.
pub fn may_split() -> bool {
    !IN_TASK.get()
}

/// Whether a product of `rows` rows of `x` by a weight of `values` values is large enough to
/// split across the pool (waking it costs tens of microseconds). Up to
/// [`crate::weight::SMALL`] rows the weight is read once whatever the rows, so its size alone
/// counts.
pub fn worth_splitting(rows: usize, values: usize) -> bool {
    let work = if rows > crate::weight::SMALL { rows.min(8) * values } else { values };
    work >= 1 << 18
}

/// Runs one task of a split: products inside it stay on this thread.
pub(crate) fn task<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_TASK.set(self.0);
        }
    }
    let _restore = Restore(IN_TASK.replace(true));
    f()
}

/// Runs `f` (a forward step) on a thread of the pool, and waits for it: one hand-off to the
/// pool and back, worth it when the step splits its products there.
pub fn step<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn a_step_runs_on_the_pool_and_its_tasks_do_not_split_again() {
        assert!(rayon::current_thread_index().is_none());
        let (on_pool, splits, inside) = step(|| {
            let inside: Vec<bool> = (0..8).into_par_iter().map(|_| task(may_split)).collect();
            (rayon::current_thread_index().is_some(), may_split(), inside)
        });
        assert!(on_pool, "the step ran outside the pool");
        assert!(splits, "a step's own products must split");
        assert_eq!(inside, [false; 8], "a task's products must stay on its thread");
        // The flag is restored however a task ends: a panic inside one leaves none set.
        assert!(std::panic::catch_unwind(|| task(|| panic!("inside a task"))).is_err());
        assert!(may_split());
    }
}
