//! The engine under both styles: check, de-duplicate, page, send with retries inside one time
//! budget, and account for every item.

use std::collections::{HashMap, HashSet, VecDeque};
use std::mem;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::sync::lock;

use super::{
    BatchCall, BatchOptions, Failure, ItemResult, Keep, Outcome, Reason, ReasonKind, Succeeded,
    Unprocessed,
};

/// An item on its way: its index in the caller's input, its size, and its history.
struct Entry<T> {
    index: usize,
    item: T,
    bytes: usize,
    attempts: u32,
    last: Option<Failure>,
}

impl<T> Entry<T> {
    fn new(index: usize, item: T, bytes: usize) -> Self {
        Entry {
            index,
            item,
            bytes,
            attempts: 0,
            last: None,
        }
    }

    fn unprocessed(self, kind: ReasonKind, failure: &Failure) -> Unprocessed<T> {
        Unprocessed {
            index: self.index,
            item: self.item,
            reason: Reason {
                kind,
                code: failure.code.clone(),
                message: failure.message.clone(),
            },
            attempts: self.attempts,
        }
    }

    /// Unprocessed because it ran out of time or attempts: the last failure it met is the reason.
    fn gave_up(self, why: &str) -> Unprocessed<T> {
        let last = self.last.clone().unwrap_or_else(|| {
            Failure::new(
                "NotSent",
                "it was still waiting for its first request",
                true,
            )
        });
        let failure = Failure::new(
            last.code,
            format!("{why}; last error: {}", last.message),
            true,
        );
        self.unprocessed(ReasonKind::GaveUp, &failure)
    }

    /// Held back, as an earlier item of its ordered group was not delivered.
    fn blocked_by_earlier<S: BatchCall<Item = T>>(self, call: &S) -> Unprocessed<T> {
        let group = call.order_key(&self.item).unwrap_or_default();
        let failure = Failure::new(
            "OrderBlocked",
            format!("an earlier item of group {group:?} was not delivered"),
            false,
        );
        self.unprocessed(ReasonKind::Blocked, &failure)
    }
}

/// Checks `item`'s size and validity; `Err` gives it back as rejected.
fn check<S: BatchCall>(
    call: &S,
    index: usize,
    item: S::Item,
) -> Result<Entry<S::Item>, Unprocessed<S::Item>> {
    let max = call.limits().max_item_bytes;
    let failure = match call.check(&item) {
        Ok(bytes) if bytes <= max => return Ok(Entry::new(index, item, bytes)),
        Ok(bytes) => Failure::new(
            "ItemTooLarge",
            format!("{bytes} bytes, over the limit of {max} bytes per item"),
            false,
        ),
        Err(failure) => failure,
    };
    Err(Entry::new(index, item, 0).unprocessed(ReasonKind::Rejected, &failure))
}

/// The one-call style: every item checked, de-duplicated on request, paged and sent.
pub(crate) async fn send_all<S: BatchCall>(
    call: Arc<S>,
    items: Vec<S::Item>,
    options: &BatchOptions,
) -> Outcome<S::Item, S::Output> {
    let started = Instant::now();
    let mut outcome = Outcome::default();
    let mut entries = Vec::with_capacity(items.len());
    // Ordered groups with a refused item, and where: the group's later items are held back.
    let mut refused_at: HashMap<String, usize> = HashMap::new();
    for (index, item) in items.into_iter().enumerate() {
        match check(&*call, index, item) {
            Ok(entry) => entries.push(entry),
            Err(rejected) => {
                if let Some(group) = call.order_key(&rejected.item) {
                    refused_at.entry(group).or_insert(index);
                }
                outcome.unprocessed.push(rejected);
            }
        }
    }
    if !refused_at.is_empty() {
        let (kept, held): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| {
            call.order_key(&e.item)
                .and_then(|group| refused_at.get(&group))
                .is_none_or(|&refused| e.index < refused)
        });
        entries = kept;
        outcome
            .unprocessed
            .extend(held.into_iter().map(|e| e.blocked_by_earlier(&*call)));
    }
    if options.deduplicate {
        entries = deduplicate(&*call, entries, &mut outcome.deduplicated);
    }
    let deadline = deadline_after(started, options.time_budget);
    let sent = send_entries(call, entries, options, deadline, &mut HashSet::new()).await;
    merge(&mut outcome, sent);
    sort(&mut outcome);
    outcome.elapsed = started.elapsed();
    outcome
}

/// Drops duplicates by the call's key and rule, logging each.
fn deduplicate<S: BatchCall>(
    call: &S,
    entries: Vec<Entry<S::Item>>,
    dropped: &mut Vec<usize>,
) -> Vec<Entry<S::Item>> {
    let keys: Vec<Option<String>> = entries.iter().map(|e| call.dedup_key(&e.item)).collect();
    // The position that survives for each key.
    let mut keeper: HashMap<&str, usize> = HashMap::new();
    for (position, key) in keys.iter().enumerate() {
        if let Some(key) = key {
            match call.keep() {
                Keep::First => {
                    keeper.entry(key).or_insert(position);
                }
                Keep::Last => {
                    keeper.insert(key, position);
                }
            }
        }
    }
    let mut kept = Vec::with_capacity(entries.len());
    for (position, entry) in entries.into_iter().enumerate() {
        match keys[position].as_deref() {
            Some(key) if keeper[key] != position => {
                tracing::warn!(index = entry.index, "dropped a duplicate item");
                dropped.push(entry.index);
            }
            _ => kept.push(entry),
        }
    }
    kept
}

/// Cuts `entries` into pages within the call's limits, in order. With `exclusive`, a page holds
/// at most one entry of each group it names.
fn paginate<T>(
    entries: Vec<Entry<T>>,
    max_items: usize,
    max_bytes: usize,
    exclusive: impl Fn(&T) -> Option<String>,
) -> VecDeque<Vec<Entry<T>>> {
    let mut pages = VecDeque::new();
    let mut page: Vec<Entry<T>> = Vec::new();
    let mut groups = HashSet::new();
    let mut bytes = 0;
    for entry in entries {
        let group = exclusive(&entry.item);
        let taken = group.as_ref().is_some_and(|g| groups.contains(g));
        if !page.is_empty() && (taken || page.len() == max_items || bytes + entry.bytes > max_bytes)
        {
            pages.push_back(mem::take(&mut page));
            groups.clear();
            bytes = 0;
        }
        groups.extend(group);
        bytes += entry.bytes;
        page.push(entry);
    }
    if !page.is_empty() {
        pages.push_back(page);
    }
    pages
}

/// What the workers share.
struct Run<S: BatchCall> {
    call: Arc<S>,
    options: BatchOptions,
    deadline: Instant,
    ordered: bool,
    pages: Mutex<VecDeque<Vec<Entry<S::Item>>>>,
    outcome: Mutex<Outcome<S::Item, S::Output>>,
    /// Ordered groups with an undelivered item: their later items are held back.
    blocked: Mutex<HashSet<String>>,
}

/// `budget` from `start`; a budget too large for the clock (`Duration::MAX` as "no limit")
/// ends a century later.
fn deadline_after(start: Instant, budget: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    start
        .checked_add(budget)
        .or_else(|| start.checked_add(CENTURY))
        .unwrap_or(start)
}

/// Sends checked entries, `concurrency` pages at a time (one at a time when ordered).
/// `blocked` holds the ordered groups that earlier sends left undelivered: their entries here
/// are held back, and the groups this send leaves undelivered are added.
async fn send_entries<S: BatchCall>(
    call: Arc<S>,
    entries: Vec<Entry<S::Item>>,
    options: &BatchOptions,
    deadline: Instant,
    blocked: &mut HashSet<String>,
) -> Outcome<S::Item, S::Output> {
    if entries.is_empty() {
        return Outcome::default();
    }
    let ordered = entries.iter().any(|e| call.order_key(&e.item).is_some());
    let limits = call.limits();
    let strict = ordered && call.strict_order();
    let pages = paginate(entries, limits.max_items, limits.max_bytes, |item| {
        strict.then(|| call.order_key(item)).flatten()
    });
    let workers = if ordered {
        1
    } else {
        options.concurrency.min(pages.len())
    };
    let run = Arc::new(Run {
        call,
        options: options.clone(),
        deadline,
        ordered,
        pages: Mutex::new(pages),
        outcome: Mutex::new(Outcome::default()),
        blocked: Mutex::new(mem::take(blocked)),
    });
    if workers == 1 {
        work(Arc::clone(&run)).await;
    } else {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers {
            tasks.spawn(work(Arc::clone(&run)));
        }
        while let Some(joined) = tasks.join_next().await {
            if let Err(error) = joined {
                // A panic in the service code: its page's items are lost to us; say so loudly
                // rather than return an outcome that silently lacks them.
                std::panic::resume_unwind(error.into_panic());
            }
        }
    }
    *blocked = mem::take(&mut *lock(&run.blocked));
    let outcome = mem::take(&mut *lock(&run.outcome));
    outcome
}

/// One worker: takes pages until there are none left.
async fn work<S: BatchCall>(run: Arc<Run<S>>) {
    loop {
        let page = lock(&run.pages).pop_front();
        let Some(page) = page else { return };
        send_page(&run, page).await;
    }
}

/// Sends one page and retries its failed items until they succeed, fail for good, or run out
/// of attempts or time.
async fn send_page<S: BatchCall>(run: &Run<S>, mut pending: Vec<Entry<S::Item>>) {
    let mut round = 0;
    loop {
        if run.ordered {
            pending = hold_back_blocked(run, pending);
        }
        if pending.is_empty() {
            return;
        }
        let remaining = run.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            end_all(run, pending, |e| e.gave_up("the time budget ran out"));
            return;
        }
        for entry in &mut pending {
            entry.attempts += 1;
        }
        let items: Vec<&S::Item> = pending.iter().map(|e| &e.item).collect();
        lock(&run.outcome).requests += 1;
        let answer = tokio::time::timeout(remaining, run.call.send(&items)).await;
        drop(items);
        let mut retry = Vec::new();
        match answer {
            Err(_) => {
                let failure = Failure::new(
                    "BudgetExhausted",
                    "the time budget ran out with the request in flight; it may have been applied",
                    false,
                );
                end_all(run, pending, |e| {
                    e.unprocessed(ReasonKind::Unknown, &failure)
                });
                return;
            }
            Ok(Err(failure)) if failure.transient => {
                for mut entry in pending {
                    entry.last = Some(failure.clone());
                    retry.push(entry);
                }
            }
            Ok(Err(failure)) if pending.len() > 1 && failure.blames_an_item() => {
                // Halve the page, so that the bad item fails alone; the halves go first, in order.
                // The refused request is not counted as an attempt of its items: an innocent item
                // keeps every retry it is allowed for failures of its own.
                tracing::debug!(code = %failure.code, items = pending.len(), "splitting a refused page");
                for entry in &mut pending {
                    entry.attempts -= 1;
                }
                let second = pending.split_off(pending.len() / 2);
                let mut pages = lock(&run.pages);
                pages.push_front(second);
                pages.push_front(pending);
                return;
            }
            Ok(Err(failure)) => {
                end_all(run, pending, |e| {
                    e.unprocessed(ReasonKind::Permanent, &failure)
                });
                return;
            }
            Ok(Ok(results)) => {
                let mut done = Vec::new();
                let mut failed = Vec::new();
                let mut results = results.into_iter();
                for mut entry in pending {
                    match results.next() {
                        Some(ItemResult::Done(output)) => done.push(Succeeded {
                            index: entry.index,
                            output,
                            attempts: entry.attempts,
                        }),
                        Some(ItemResult::Failed(failure)) if failure.transient => {
                            entry.last = Some(failure);
                            retry.push(entry);
                        }
                        Some(ItemResult::Failed(failure)) => {
                            failed.push(entry.unprocessed(ReasonKind::Permanent, &failure));
                        }
                        None => {
                            entry.last = Some(Failure::no_result());
                            retry.push(entry);
                        }
                    }
                }
                block(run, &failed);
                let mut outcome = lock(&run.outcome);
                outcome.succeeded.extend(done);
                outcome.unprocessed.extend(failed);
            }
        }
        if retry.is_empty() {
            return;
        }
        round += 1;
        let (spent, mut again): (Vec<_>, Vec<_>) = retry
            .into_iter()
            .partition(|e| e.attempts >= run.options.max_attempts);
        if !spent.is_empty() {
            let why = format!("{} attempts made", run.options.max_attempts);
            end_all(run, spent, |e| e.gave_up(&why));
        }
        if again.is_empty() {
            return;
        }
        let wait = run.options.retry.backoff(round);
        // Compared as durations: a huge backoff ("never retry") must not overflow an instant.
        if wait >= run.deadline.saturating_duration_since(Instant::now()) {
            end_all(run, again, |e| e.gave_up("the time budget ran out"));
            return;
        }
        tracing::debug!(items = again.len(), ?wait, "retrying failed items");
        tokio::time::sleep(wait).await;
        again.shrink_to_fit();
        pending = again;
    }
}

/// Ends every entry with `why`, blocking their ordered groups.
fn end_all<S: BatchCall>(
    run: &Run<S>,
    entries: Vec<Entry<S::Item>>,
    why: impl Fn(Entry<S::Item>) -> Unprocessed<S::Item>,
) {
    let ended: Vec<_> = entries.into_iter().map(why).collect();
    block(run, &ended);
    lock(&run.outcome).unprocessed.extend(ended);
}

/// Marks the ordered groups of undelivered items, so that their later items are held back.
fn block<S: BatchCall>(run: &Run<S>, ended: &[Unprocessed<S::Item>]) {
    if !run.ordered || ended.is_empty() {
        return;
    }
    let mut blocked = lock(&run.blocked);
    blocked.extend(ended.iter().filter_map(|u| run.call.order_key(&u.item)));
}

/// Takes out the entries whose ordered group is blocked, as [`ReasonKind::Blocked`].
fn hold_back_blocked<S: BatchCall>(
    run: &Run<S>,
    pending: Vec<Entry<S::Item>>,
) -> Vec<Entry<S::Item>> {
    let blocked = lock(&run.blocked);
    if blocked.is_empty() {
        return pending;
    }
    let mut kept = Vec::with_capacity(pending.len());
    let mut held = Vec::new();
    for entry in pending {
        match run.call.order_key(&entry.item) {
            Some(group) if blocked.contains(&group) => {
                held.push(entry.blocked_by_earlier(&*run.call));
            }
            _ => kept.push(entry),
        }
    }
    drop(blocked);
    lock(&run.outcome).unprocessed.extend(held);
    kept
}

/// Adds `part` to `total`.
fn merge<T, O>(total: &mut Outcome<T, O>, part: Outcome<T, O>) {
    total.succeeded.extend(part.succeeded);
    total.unprocessed.extend(part.unprocessed);
    total.deduplicated.extend(part.deduplicated);
    total.requests += part.requests;
}

/// Puts each list in index order, as the outcome promises (workers finish in any order).
fn sort<T, O>(outcome: &mut Outcome<T, O>) {
    outcome.succeeded.sort_by_key(|s| s.index);
    outcome.unprocessed.sort_by_key(|u| u.index);
    outcome.deduplicated.sort_unstable();
}

/// What [`Dispatcher::submit`] did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Buffered, to go with the next full batch or flush.
    Buffered,
    /// It filled a batch, which was sent (with its retries) before `submit` returned.
    Sent,
    /// Dropped (or it replaced an earlier one) as a duplicate; logged, and listed in the flush's
    /// [`Outcome::deduplicated`].
    Duplicate,
    /// Refused before sending; in the flush's [`Outcome::unprocessed`].
    Rejected,
}

/// The dispatcher style: submit items one at a time; full batches go out as they fill up, and
/// [`flush`](Dispatcher::flush) sends the rest.
///
/// Indexes in the outcome count submissions since the previous flush. Items still buffered when
/// a dispatcher is dropped are not sent: call `flush` first (a drop with buffered items logs an
/// error naming how many).
pub struct Dispatcher<S: BatchCall> {
    call: Arc<S>,
    options: BatchOptions,
    buffer: Vec<Entry<S::Item>>,
    buffer_bytes: usize,
    /// Dedup key → submission index of the buffered item holding it.
    keys: HashMap<String, usize>,
    /// Ordered groups with an undelivered item since the last flush: their later items are
    /// held back, whichever batch they go out in.
    blocked: HashSet<String>,
    next_index: usize,
    started: Option<Instant>,
    /// Everything since the last flush.
    outcome: Outcome<S::Item, S::Output>,
}

impl<S: BatchCall> Dispatcher<S> {
    pub(crate) fn new(call: Arc<S>, options: BatchOptions) -> Self {
        Dispatcher {
            call,
            options,
            buffer: Vec::new(),
            buffer_bytes: 0,
            keys: HashMap::new(),
            blocked: HashSet::new(),
            next_index: 0,
            started: None,
            outcome: Outcome::default(),
        }
    }

    /// Items buffered, not yet sent.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Buffers `item`; sends the buffer first if the item would not fit in it, and sends the
    /// batch once it holds the service's maximum count.
    pub async fn submit(&mut self, item: S::Item) -> Submitted {
        let index = self.next_index;
        self.next_index += 1;
        self.started.get_or_insert_with(Instant::now);
        let entry = match check(&*self.call, index, item) {
            Ok(entry) => entry,
            Err(rejected) => {
                if let Some(group) = self.call.order_key(&rejected.item) {
                    // The group's earlier items go now; its later ones are held back.
                    self.send_buffer().await;
                    self.blocked.insert(group);
                }
                self.outcome.unprocessed.push(rejected);
                return Submitted::Rejected;
            }
        };
        // A full buffer goes first: the de-duplication below is within the batch this entry
        // joins.
        let limits = self.call.limits();
        if !self.buffer.is_empty() && self.buffer_bytes + entry.bytes > limits.max_bytes {
            self.send_buffer().await;
        }
        let mut duplicate = false;
        if self.options.deduplicate {
            if let Some(key) = self.call.dedup_key(&entry.item) {
                if let Some(&earlier) = self.keys.get(&key) {
                    duplicate = true;
                    match self.call.keep() {
                        Keep::First => {
                            tracing::warn!(index, "dropped a duplicate item");
                            self.outcome.deduplicated.push(index);
                            return Submitted::Duplicate;
                        }
                        Keep::Last => {
                            tracing::warn!(
                                index = earlier,
                                "dropped an item superseded by a later duplicate"
                            );
                            let position = self.buffer.iter().position(|e| e.index == earlier);
                            if let Some(position) = position {
                                let old = self.buffer.remove(position);
                                self.buffer_bytes -= old.bytes;
                            }
                            self.outcome.deduplicated.push(earlier);
                        }
                    }
                }
                self.keys.insert(key, index);
            }
        }
        self.buffer_bytes += entry.bytes;
        self.buffer.push(entry);
        if self.buffer.len() >= limits.max_items {
            self.send_buffer().await;
            return Submitted::Sent;
        }
        if duplicate {
            Submitted::Duplicate
        } else {
            Submitted::Buffered
        }
    }

    /// Sends what is buffered and returns the outcome of every item submitted since the previous
    /// flush (and only those), then starts afresh.
    pub async fn flush(&mut self) -> Outcome<S::Item, S::Output> {
        self.send_buffer().await;
        self.blocked.clear();
        let mut outcome = mem::take(&mut self.outcome);
        sort(&mut outcome);
        outcome.elapsed = self.started.take().map_or(Duration::ZERO, |s| s.elapsed());
        self.next_index = 0;
        outcome
    }

    async fn send_buffer(&mut self) {
        self.keys.clear();
        self.buffer_bytes = 0;
        let entries = mem::take(&mut self.buffer);
        if entries.is_empty() {
            return;
        }
        let deadline = deadline_after(Instant::now(), self.options.time_budget);
        let sent = send_entries(
            Arc::clone(&self.call),
            entries,
            &self.options,
            deadline,
            &mut self.blocked,
        )
        .await;
        merge(&mut self.outcome, sent);
    }
}

impl<S: BatchCall> Drop for Dispatcher<S> {
    fn drop(&mut self) {
        if !self.buffer.is_empty() || !self.outcome.unprocessed.is_empty() {
            tracing::error!(
                buffered = self.buffer.len(),
                unprocessed = self.outcome.unprocessed.len(),
                "a batch dispatcher was dropped without a final flush: its buffered items were not sent"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_respect_count_and_bytes_and_keep_order() {
        let entries: Vec<Entry<u32>> = (0..25).map(|i| Entry::new(i, i as u32, 10)).collect();
        let pages = paginate(entries, 10, 1_000, |_| None);
        let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
        assert_eq!(sizes, [10, 10, 5]);
        let order: Vec<usize> = pages.iter().flatten().map(|e| e.index).collect();
        assert_eq!(order, (0..25).collect::<Vec<_>>());

        let entries: Vec<Entry<u32>> = [60, 50, 40, 100, 1]
            .iter()
            .enumerate()
            .map(|(i, b)| Entry::new(i, 0, *b))
            .collect();
        let pages = paginate(entries, 10, 100, |_| None);
        let bytes: Vec<Vec<usize>> = pages
            .iter()
            .map(|p| p.iter().map(|e| e.bytes).collect())
            .collect();
        assert_eq!(bytes, [vec![60], vec![50, 40], vec![100], vec![1]]);
    }

    #[test]
    fn exclusive_groups_never_share_a_page() {
        let groups = ["a", "a", "b", "c", "b", "a"];
        let entries: Vec<Entry<&str>> = groups
            .iter()
            .enumerate()
            .map(|(i, g)| Entry::new(i, *g, 1))
            .collect();
        let pages = paginate(entries, 10, 100, |g| Some(g.to_string()));
        let indexes: Vec<Vec<usize>> = pages
            .iter()
            .map(|p| p.iter().map(|e| e.index).collect())
            .collect();
        assert_eq!(indexes, [vec![0], vec![1, 2, 3], vec![4, 5]]);
    }
}
