//! Cache prefetch hints. A record put to one of thousands of shards finds that shard's
//! aggregator out of the cache: each of its cache lines the put reads is a separate wait for
//! memory, one after the other as the code reaches them. Asking for all of them at once, as
//! soon as their addresses are known, lets those waits overlap.

/// Asks the CPU to bring the cache lines holding the `bytes` bytes from `start` into its cache,
/// the first `MAX_BYTES` of them (a longer read is streamed in by the CPU's own prefetcher once
/// it has started). A hint only: nothing is read, and an address that is not mapped is
/// ignored. Zero bytes ask for nothing.
#[inline(always)]
pub(crate) fn prefetch<T>(start: *const T, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 64;
        if bytes == 0 {
            return;
        }
        let start = start.cast::<i8>();
        let skew = start.addr() % LINE;
        let first = start.wrapping_sub(skew);
        let end = skew + bytes.min(MAX_BYTES);
        let mut offset = 0;
        while offset < end {
            // SAFETY: a prefetch never faults and writes nothing, whatever the address; it needs
            // SSE, which every x86_64 CPU has.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(offset)) };
            offset += LINE;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, bytes);
}

const MAX_BYTES: usize = 4 << 10;

/// Asks for the lines holding `items` (the first `MAX_BYTES` of them).
#[inline(always)]
pub(crate) fn prefetch_slice<T>(items: &[T]) {
    prefetch(items.as_ptr(), size_of_val(items));
}

/// Asks for the line where the next element pushed to `items` goes, when it has room for one
/// (an empty vector's pointer is a placeholder, and a full one's end lies past its buffer).
#[inline(always)]
pub(crate) fn prefetch_spare<T>(items: &Vec<T>) {
    if items.len() < items.capacity() {
        prefetch(items.as_ptr_range().end, size_of::<T>());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_address_and_length_is_only_a_hint() {
        let mut data = vec![7u8; 1000];
        prefetch(data.as_ptr(), data.len());
        prefetch(data.as_ptr().wrapping_add(999), 1);
        prefetch(std::ptr::null::<u8>(), 256);
        prefetch(usize::MAX as *const u64, 64);
        prefetch(data.as_ptr(), 0);
        prefetch(data.as_ptr(), usize::MAX);
        prefetch_spare(&data);
        prefetch_spare(&Vec::<u64>::new());
        prefetch_slice(&data);
        prefetch_slice::<u64>(&[]);
        data.reserve(1);
        prefetch_spare(&data);
        assert_eq!(data, vec![7u8; 1000]);
    }
}
