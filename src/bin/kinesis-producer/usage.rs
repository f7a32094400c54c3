//! CPU time and peak memory, from getrusage(2).

fn rusage(who: libc::c_int) -> libc::rusage {
    // SAFETY: getrusage only writes the struct it is given; all-zero bytes are a valid rusage.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    }
}

fn seconds(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 * 1e-6
}

/// User + system CPU seconds of the whole process so far.
pub fn process_cpu_seconds() -> f64 {
    let usage = rusage(libc::RUSAGE_SELF);
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// User + system CPU seconds of the calling thread so far.
pub fn thread_cpu_seconds() -> f64 {
    let usage = rusage(libc::RUSAGE_THREAD);
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The process's peak resident set size, in bytes.
pub fn peak_rss_bytes() -> u64 {
    // Linux reports ru_maxrss in KiB.
    rusage(libc::RUSAGE_SELF).ru_maxrss.max(0) as u64 * 1024
}

/// A nanosecond-resolution CPU clock for the calling thread, for timing short pieces of work.
pub fn thread_cpu_nanos() -> u64 {
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe {
        let mut t: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t);
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    }
}
