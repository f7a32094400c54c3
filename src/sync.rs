//! Locking shared by the producer and the batch helpers.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, carrying on if a panicking thread poisoned it: every critical section in this
/// crate leaves its data consistent at each step, so a panic elsewhere must not turn every
/// later call into a panic too.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_is_still_locked_with_its_data() {
        let mutex = Mutex::new(vec![1]);
        let poisoning = std::panic::catch_unwind(|| {
            let mut held = mutex.lock().unwrap();
            held.push(2);
            panic!("poisons the mutex");
        });
        assert!(poisoning.is_err());
        assert!(mutex.is_poisoned());
        lock(&mutex).push(3);
        assert_eq!(*lock(&mutex), vec![1, 2, 3]);
    }
}
