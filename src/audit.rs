//! The audit trail: structured events (tracing target `audit`) that account for every call to the
//! credential service, authenticated or refused: caller, method, account and outcome (the gRPC code
//! name). Never a secret, and never raw input: the method comes from the known method table
//! (`unknown` otherwise), the account is the parsed name or empty.
//!
//! Two kinds of event, both at INFO:
//! - [`record`]: one event per call, written at once. For operator actions (BeginAuth,
//!   CompleteAuth, the admin RPCs by an admin): rare, and each one matters on its own.
//! - [`count`]: aggregated. Token reads (tens of thousands a second) and refusals (which anyone on
//!   the network can cause) are counted per (caller, method, account, outcome, peer) and written
//!   once per `--audit-interval` as one `calls` event with a `count` field and the `first` and
//!   `last` time. Counting touches only the calling thread's own table (its mutex is contended
//!   only by the flush, once an interval), so no lock is shared between calls. [`flush`] at
//!   shutdown writes what is left, so the `count`s always add up to the number of calls.
//!   Served token reads take a shorter way in, so that a read of one of 100,000 accounts neither
//!   builds, compares nor allocates a key, nor misses the cache on a table of every account:
//!   [`count_token_read_in`] counts the account's usual caller in the account's own memory
//!   ([`AccountReads`], held by the broker), and [`count_token_read`] any other caller in the
//!   thread's table, keyed by the addresses of names the broker and the callers table keep alive.
//!
//! Refused calls carry the peer's IP address (the caller is then unknown or untrusted); so that
//! an attacker cannot grow the table without bound, refusals beyond `--audit-max-keys` distinct
//! keys per thread and interval are counted under `account="(others)"`, `peer="(others)"`, and the
//! flush says so in a warning.

use std::{
    cell::Cell,
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use hashbrown::HashTable;
use tonic::{Code, Status};

use crate::{account::AccountId, clock};

mod file;

pub use file::{FileConfig, Installed, install, refusing, reopen};

use tracing::Level;

use credential_client::code_name;

/// The audit settings (`--audit-interval`, `--audit-max-keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    /// How often aggregated events are written.
    pub interval: Duration,
    /// Most distinct refusal keys a thread keeps per interval before folding the rest.
    pub max_keys: usize,
}

/// `--audit-interval`'s default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// `--audit-max-keys`' default.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INTERVAL,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

/// What refusals fold into once a thread's table holds `max_keys` keys.
pub const OTHERS: &str = "(others)";

static MAX_KEYS: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_KEYS);

thread_local! {
    /// Set by [`record`] and [`count`]: lets [`Scope`] tell a call its handler audited from one
    /// that tonic refused before the handler ran.
    static AUDITED: Cell<bool> = const { Cell::new(false) };
}

/// Records one call, at once. `caller` and `account` may be empty when not (yet) known.
pub fn record(method: &str, caller: &str, account: &str, outcome: Code) {
    AUDITED.set(true);
    let outcome = code_name(outcome);
    let line = file::Line {
        time: &file::timestamp(SystemTime::now()),
        event: "call",
        caller,
        method,
        account,
        outcome,
        count: None,
        first: None,
        last: None,
        peer: None,
        reason: None,
    };
    if !file::write_event(&line) {
        tracing::event!(target: "audit", Level::INFO, caller, method, account, outcome, "call");
    }
}

/// Counts one call into the next aggregated event; see the module docs. `peer` is for refusals.
pub fn count(method: &str, caller: &str, account: &str, outcome: Code, peer: Option<IpAddr>) {
    count_with_reason(method, caller, account, "", outcome, peer);
}

/// Counts one refused call with why it was refused (`reason`: a fixed phrase such as "expired",
/// never input), and the caller when known (a good signature on an expired token).
pub fn count_refusal(
    method: &str,
    caller: &str,
    reason: &'static str,
    outcome: Code,
    peer: Option<IpAddr>,
) {
    count_with_reason(method, caller, "", reason, outcome, peer);
}

fn count_with_reason(
    method: &str,
    caller: &str,
    account: &str,
    reason: &str,
    outcome: Code,
    peer: Option<IpAddr>,
) {
    AUDITED.set(true);
    let now = clock::coarse_now();
    SHARD.with(|shard| {
        let mut local = shard.lock().unwrap_or_else(|e| e.into_inner());
        let Local { map, key, .. } = &mut *local;
        encode(key, outcome, peer, [method, caller, account, reason]);
        if let Some(tally) = map.get_mut(key.as_slice()) {
            tally.add(now);
            return;
        }
        if outcome != Code::Ok && map.len() >= MAX_KEYS.load(Ordering::Relaxed) {
            // Refusals can carry anything a client sends: fold them rather than grow.
            encode(key, outcome, None, [method, caller, OTHERS, reason]);
            key[1] = PEER_OTHERS;
            if let Some(tally) = map.get_mut(key.as_slice()) {
                tally.add(now);
                return;
            }
        }
        map.insert(key.as_slice().into(), Tally::new(now));
    });
}

/// Counts one GetToken answered with a token, like [`count`] but keyed by address: `caller` must
/// be the name a [`crate::auth::Caller`] keeps and `account` the broker's own [`AccountId`] (two
/// allocations of one name are counted apart and merged when written, so any other is correct,
/// only slower).
pub fn count_token_read(caller: &Arc<str>, account: &AccountId) {
    AUDITED.set(true);
    let now = clock::coarse_now();
    let (caller_at, account_at) = (caller.as_ptr() as usize, account.address());
    let hash = read_hash(caller_at, account_at);
    SHARD.with(|shard| {
        let mut local = shard.lock().unwrap_or_else(|e| e.into_inner());
        let Local { reads, names, .. } = &mut *local;
        let now_ms = clock::to_unix_ms(now);
        if let Some(read) = reads.find_mut(hash, |r| r.key == (caller_at, account_at)) {
            read.count += 1;
            read.last_ms = read.last_ms.max(now_ms);
            return;
        }
        names.push(ReadNames {
            caller: caller.clone(),
            account: account.clone(),
            first: now,
        });
        let read = Read {
            key: (caller_at, account_at),
            count: 1,
            last_ms: now_ms,
            names: u32::try_from(names.len() - 1).unwrap_or(u32::MAX),
        };
        reads.insert_unique(hash, read, |r| read_hash(r.key.0, r.key.1));
    });
}

/// Token reads of one account by its usual caller, counted in the account's own memory, which
/// the read has just touched: a count in a table of 100,000 accounts would be a cache miss per read.
/// Reads by any other caller in the same interval go to the thread's table
/// ([`count_token_read`]); the flush merges both, so one key is still one event.
#[derive(Default)]
pub struct AccountReads(Mutex<Option<Resident>>);

/// The counted reads of the caller that read an account first in this interval.
struct Resident {
    caller: Arc<str>,
    count: u64,
    first_ms: i64,
    last_ms: i64,
}

/// What the audit needs of an account to count its reads in place.
pub trait ReadCounted: Send + Sync + 'static {
    fn reads(&self) -> &AccountReads;
    /// The account's name, as for [`count_token_read`].
    fn account(&self) -> &AccountId;
}

/// The accounts with resident counts since the last flush, each once.
static RESIDENTS: Mutex<Vec<Arc<dyn ReadCounted>>> = Mutex::new(Vec::new());

/// Counts one GetToken answered with a token for `counted`'s account: in the account when `caller`
/// is its resident reader (or it has none yet this interval), else as [`count_token_read`].
pub fn count_token_read_in<C: ReadCounted>(caller: &Arc<str>, counted: &Arc<C>) {
    AUDITED.set(true);
    let now_ms = clock::to_unix_ms(clock::coarse_now());
    let mut resident = counted.reads().0.lock().unwrap_or_else(|e| e.into_inner());
    match &mut *resident {
        Some(r) if Arc::ptr_eq(&r.caller, caller) => {
            r.count += 1;
            r.last_ms = r.last_ms.max(now_ms);
        }
        Some(_) => {
            drop(resident);
            count_token_read(caller, counted.account());
        }
        None => {
            *resident = Some(Resident {
                caller: caller.clone(),
                count: 1,
                first_ms: now_ms,
                last_ms: now_ms,
            });
            // Under the account's lock, so the flush that takes this count finds it listed.
            let listed: Arc<dyn ReadCounted> = counted.clone();
            RESIDENTS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(listed);
        }
    }
}

/// One thread's count of one caller's token reads of one account (see [`count_token_read`]):
/// what every read touches, small so that 100,000 accounts' counts stay in the cache.
struct Read {
    /// The addresses of the caller's and the account's names.
    key: (usize, usize),
    count: u64,
    /// Unix milliseconds: half a `SystemTime`.
    last_ms: i64,
    /// Where in [`Local::names`] the names are.
    names: u32,
}

/// What a [`Read`] is written with, touched only when it is first counted and when written. The
/// names it holds keep their addresses from being reused for other names while they are a key.
struct ReadNames {
    caller: Arc<str>,
    account: AccountId,
    first: SystemTime,
}

fn read_hash(caller_at: usize, account_at: usize) -> u64 {
    use std::hash::BuildHasher;
    static STATE: std::sync::LazyLock<foldhash::fast::FixedState> =
        std::sync::LazyLock::new(|| foldhash::fast::FixedState::with_seed(rand::random()));
    STATE.hash_one((caller_at, account_at))
}

/// The outcome of a handler's result.
pub fn outcome<T>(result: &Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Applies `config` and writes aggregated events every `config.interval`, for as long as it runs.
/// The server runs it beside the gRPC service and calls [`flush`] once more after it stops.
pub async fn run_flusher(config: AuditConfig) {
    MAX_KEYS.store(config.max_keys.max(1), Ordering::Relaxed);
    let interval = config.interval.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    // While `--audit-required` refuses calls, the file is tried again more often than that.
    let mut retry = tokio::time::interval(interval.min(RETRY_EVERY));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Formatting thousands of events must not hold up a worker thread that serves calls.
                let _ = tokio::task::spawn_blocking(flush).await;
            }
            _ = retry.tick(), if refusing() => {
                let _ = tokio::task::spawn_blocking(file::retry).await;
            }
        }
    }
}

/// How soon calls refused by `--audit-required` are served again once the file can be written.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Writes one event per key counted since the last flush, from every thread's table.
pub fn flush() {
    // One flush at a time, so two never interleave their events.
    static FLUSHING: Mutex<()> = Mutex::new(());
    let _one = FLUSHING.lock().unwrap_or_else(|e| e.into_inner());
    let shards: Vec<Arc<Mutex<Local>>> = {
        let mut shards = SHARDS.lock().unwrap_or_else(|e| e.into_inner());
        // A thread that ended leaves its table here; drop it once it is drained.
        shards.retain(|s| {
            let local = s.lock().unwrap_or_else(|e| e.into_inner());
            Arc::strong_count(s) > 1 || !local.map.is_empty() || !local.reads.is_empty()
        });
        shards.clone()
    };
    // Calls counted by key (refusals, failures: few), and served token reads (one per account and
    // caller read in the interval: 100,000 and more), merged apart.
    let mut merged: BTreeMap<Box<[u8]>, Tally> = BTreeMap::new();
    let mut served = ServedReads::default();
    for shard in shards {
        let (taken, reads, names) = {
            let mut local = shard.lock().unwrap_or_else(|e| e.into_inner());
            let (capacity, reads) = (local.map.capacity(), local.reads.capacity());
            (
                std::mem::replace(
                    &mut local.map,
                    HashMap::with_capacity_and_hasher(capacity, Default::default()),
                ),
                std::mem::replace(&mut local.reads, HashTable::with_capacity(reads)),
                std::mem::replace(&mut local.names, Vec::with_capacity(reads)),
            )
        };
        for (key, tally) in taken {
            // A served read counted by key (not the broker's way, but one key is one event).
            if let Some((caller, account)) = served_read(&key) {
                served.add(caller, account, tally);
                continue;
            }
            merged
                .entry(key)
                .and_modify(|t| t.merge(&tally))
                .or_insert(tally);
        }
        let mut names: Vec<Option<ReadNames>> = names.into_iter().map(Some).collect();
        for read in reads {
            let Some(names) = names.get_mut(read.names as usize).and_then(Option::take) else {
                continue; // more than 4 billion keys in one interval: not reachable
            };
            let tally = Tally {
                count: read.count,
                first: names.first,
                last: clock::from_unix_ms(read.last_ms),
            };
            served.add(names.caller, names.account, tally);
        }
    }
    // Listed accounts are taken after the threads' tables: a read counted in a table after that
    // is in the next flush either way.
    let residents = std::mem::take(&mut *RESIDENTS.lock().unwrap_or_else(|e| e.into_inner()));
    for counted in residents {
        let taken = counted
            .reads()
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(r) = taken else { continue };
        let tally = Tally {
            count: r.count,
            first: clock::from_unix_ms(r.first_ms),
            last: clock::from_unix_ms(r.last_ms),
        };
        served.add(r.caller, counted.account().clone(), tally);
    }
    let events = merged
        .iter()
        .filter_map(|(key, tally)| Some((decode(key)?, tally)))
        .chain(
            served
                .entries
                .iter()
                .map(|read| (read.event(), &read.tally)),
        );
    let mut folded = 0u64;
    if file::installed() {
        folded = write_to_file(events);
    } else {
        for (event, tally) in events {
            if event.peer == OTHERS {
                folded += tally.count;
            }
            log_calls(&event, tally);
        }
    }
    if folded > 0 {
        tracing::warn!(
            target: "audit",
            calls = folded,
            max_keys = MAX_KEYS.load(Ordering::Relaxed),
            "more distinct refusals than --audit-max-keys in one interval; the rest are counted under (others)"
        );
    }
}

/// The caller and account of a key that counted a served token read, if it did.
fn served_read(key: &[u8]) -> Option<(Arc<str>, AccountId)> {
    if key.first() != Some(&(Code::Ok as i32 as u8)) || key.get(1) != Some(&PEER_NONE) {
        return None;
    }
    let event = decode(key)?;
    if event.method != "GetToken" || !event.reason.is_empty() {
        return None;
    }
    let account = AccountId::parse(event.account).ok()?;
    Some((Arc::from(event.caller), account))
}

/// A flush's served token reads, one per caller and account name. Merged by name, not by the
/// addresses they were counted under: a reloaded callers file or an account removed and added
/// again gives one name two allocations, and one key must still be one event.
#[derive(Default)]
struct ServedReads {
    entries: Vec<ServedRead>,
    index: HashTable<usize>,
    state: foldhash::fast::RandomState,
}

struct ServedRead {
    caller: Arc<str>,
    account: AccountId,
    tally: Tally,
}

impl ServedRead {
    fn event(&self) -> Event<'_> {
        Event {
            outcome: code_name(Code::Ok),
            peer: String::new(),
            method: "GetToken",
            caller: &self.caller,
            account: self.account.as_str(),
            reason: "",
        }
    }
}

impl ServedReads {
    fn add(&mut self, caller: Arc<str>, account: AccountId, tally: Tally) {
        use std::hash::BuildHasher;
        let hash_of =
            |caller: &str, account: &AccountId| self.state.hash_one((caller, account.as_str()));
        let hash = hash_of(&caller, &account);
        let entries = &mut self.entries;
        let same = |&i: &usize| *entries[i].caller == *caller && entries[i].account == account;
        if let Some(&i) = self.index.find(hash, same) {
            entries[i].tally.merge(&tally);
            return;
        }
        entries.push(ServedRead {
            caller,
            account,
            tally,
        });
        let at = entries.len() - 1;
        self.index.insert_unique(hash, at, |&i| {
            hash_of(&entries[i].caller, &entries[i].account)
        });
    }
}

/// One aggregated event, into the logs. Only refusals with a reason (a JWT's, say) carry the
/// field: an absent `Option` records nothing.
fn log_calls(event: &Event<'_>, tally: &Tally) {
    tracing::event!(
        target: "audit",
        Level::INFO,
        caller = event.caller,
        method = event.method,
        account = event.account,
        outcome = event.outcome,
        count = tally.count,
        first = %humantime::format_rfc3339_millis(tally.first),
        last = %humantime::format_rfc3339_millis(tally.last),
        peer = %event.peer,
        reason = (!event.reason.is_empty()).then_some(event.reason),
        "calls"
    );
}

/// Every aggregated event as one write to the audit file (then synced); returns the calls
/// folded under `(others)`.
fn write_to_file<'a>(events: impl Iterator<Item = (Event<'a>, &'a Tally)>) -> u64 {
    let now = file::timestamp(SystemTime::now());
    let mut buf = Vec::new();
    let (mut first, mut last) = (String::new(), String::new());
    let mut folded = 0;
    let mut lines = 0;
    for (event, tally) in events {
        if event.peer == OTHERS {
            folded += tally.count;
        }
        file::timestamp_into(&mut first, tally.first);
        file::timestamp_into(&mut last, tally.last);
        file::Line {
            time: &now,
            event: "calls",
            caller: event.caller,
            method: event.method,
            account: event.account,
            outcome: event.outcome,
            count: Some(tally.count),
            first: Some(&first),
            last: Some(&last),
            peer: Some(&event.peer),
            reason: (!event.reason.is_empty()).then_some(event.reason),
        }
        .append_to(&mut buf);
        lines += 1;
    }
    file::write_batch(buf, lines);
    folded
}

/// Marks the calls a future serves, so the call layer can audit what no handler did (calls tonic
/// refused before the handler: undecodable, missing or compressed messages, unknown methods).
#[derive(Default)]
pub struct Scope {
    audited: bool,
}

impl Scope {
    /// Polls `f` with this call's mark in place.
    pub fn enter<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let outer = AUDITED.replace(self.audited);
        let out = f();
        self.audited = AUDITED.replace(outer);
        out
    }

    /// Whether a handler recorded the call.
    pub fn audited(&self) -> bool {
        self.audited
    }
}

struct Tally {
    count: u64,
    first: SystemTime,
    last: SystemTime,
}

impl Tally {
    fn new(now: SystemTime) -> Self {
        Self {
            count: 1,
            first: now,
            last: now,
        }
    }

    fn add(&mut self, now: SystemTime) {
        self.count += 1;
        self.last = self.last.max(now);
    }

    fn merge(&mut self, other: &Tally) {
        self.count += other.count;
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }
}

/// One thread's counts, and the buffer its keys are built in (so counting does not allocate).
#[derive(Default)]
struct Local {
    map: HashMap<Box<[u8]>, Tally, foldhash::fast::RandomState>,
    key: Vec<u8>,
    reads: HashTable<Read>,
    names: Vec<ReadNames>,
}

static SHARDS: Mutex<Vec<Arc<Mutex<Local>>>> = Mutex::new(Vec::new());

thread_local! {
    static SHARD: Arc<Mutex<Local>> = {
        let shard = Arc::new(Mutex::new(Local::default()));
        SHARDS.lock().unwrap_or_else(|e| e.into_inner()).push(shard.clone());
        shard
    };
}

const PEER_NONE: u8 = 0;
const PEER_V4: u8 = 4;
const PEER_V6: u8 = 6;
const PEER_OTHERS: u8 = 0xff;

/// The key: outcome, peer (tag and octets), then method, caller, account and reason, each
/// length-prefixed, so any text round-trips.
fn encode(key: &mut Vec<u8>, outcome: Code, peer: Option<IpAddr>, texts: [&str; 4]) {
    key.clear();
    key.push(outcome as i32 as u8);
    match peer {
        None => key.push(PEER_NONE),
        Some(IpAddr::V4(ip)) => {
            key.push(PEER_V4);
            key.extend_from_slice(&ip.octets());
        }
        Some(IpAddr::V6(ip)) => {
            key.push(PEER_V6);
            key.extend_from_slice(&ip.octets());
        }
    }
    for text in texts {
        let bytes = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
        key.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        key.extend_from_slice(bytes);
    }
}

struct Event<'a> {
    outcome: &'static str,
    peer: String,
    method: &'a str,
    caller: &'a str,
    account: &'a str,
    reason: &'a str,
}

fn decode(key: &[u8]) -> Option<Event<'_>> {
    let (&outcome, rest) = key.split_first()?;
    let (&tag, mut rest) = rest.split_first()?;
    let peer = match tag {
        PEER_V4 => {
            let (ip, r) = rest.split_first_chunk::<4>()?;
            rest = r;
            IpAddr::from(*ip).to_string()
        }
        PEER_V6 => {
            let (ip, r) = rest.split_first_chunk::<16>()?;
            rest = r;
            IpAddr::from(*ip).to_string()
        }
        PEER_OTHERS => OTHERS.to_owned(),
        _ => String::new(),
    };
    let mut text = || -> Option<&str> {
        let (len, r) = rest.split_first_chunk::<2>()?;
        let (bytes, r) = r.split_at_checked(usize::from(u16::from_le_bytes(*len)))?;
        rest = r;
        // Cut at a byte boundary only when a name was longer than 64 KiB.
        Some(std::str::from_utf8(bytes).unwrap_or(OTHERS))
    };
    Some(Event {
        outcome: code_name(Code::from_i32(i32::from(outcome))),
        peer,
        method: text()?,
        caller: text()?,
        account: text()?,
        reason: text()?,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Account {
        reads: AccountReads,
        name: AccountId,
    }

    impl ReadCounted for Account {
        fn reads(&self) -> &AccountReads {
            &self.reads
        }
        fn account(&self) -> &AccountId {
            &self.name
        }
    }

    /// One test, because a flush drains every thread's counts: two tests flushing at once would
    /// take each other's.
    #[test]
    fn counts_stay_exact_across_threads_and_flushes_and_one_key_is_one_event_per_flush() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .json()
                .with_writer(move || writer.clone())
                .finish(),
        );
        let (resident, visitor): (Arc<str>, Arc<str>) =
            (Arc::from("json-test"), Arc::from("json-visitor"));
        let account = Arc::new(Account {
            reads: AccountReads::default(),
            name: AccountId::parse("acme").unwrap(),
        });
        let counting = AtomicUsize::new(4);
        std::thread::scope(|scope| {
            for i in 0..4 {
                let (resident, visitor, account) = (&resident, &visitor, &account);
                let counting = &counting;
                scope.spawn(move || {
                    for n in 0..2_000 {
                        match (i + n) % 4 {
                            // Whoever comes first in an interval counts in place, the other in
                            // the thread's table.
                            0 => count_token_read_in(resident, account),
                            1 => count_token_read_in(visitor, account),
                            2 => count_token_read(resident, &account.name),
                            _ => count("GetToken", "json-test", "acme", Code::Ok, None),
                        }
                    }
                    counting.fetch_sub(1, Ordering::AcqRel);
                });
            }
            // Flushes while they count: no call is lost or counted twice across them.
            let dispatch = dispatch.clone();
            let counting = &counting;
            scope.spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    while counting.load(Ordering::Acquire) > 0 {
                        flush();
                    }
                })
            });
        });
        // What the flusher left (it may have stopped before the last counts).
        tracing::dispatcher::with_default(&dispatch, flush);
        let before = buffer.0.lock().unwrap().len();
        tracing::dispatcher::with_default(&dispatch, || {
            // Other allocations of the same names, and another outcome: counted apart, merged
            // into the same events when written; the outcome its own event.
            let (other_caller, other_account): (Arc<str>, _) =
                (Arc::from("json-test"), AccountId::parse("acme").unwrap());
            for _ in 0..7 {
                count_token_read(&other_caller, &other_account);
            }
            count_token_read_in(&resident, &account);
            count("GetToken", "json-test", "acme", Code::Ok, None);
            count("GetToken", "json-test", "acme", Code::Unavailable, None);
            flush();
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["fields"]["account"] == "acme")
            .collect();
        let counts = |caller: &str, outcome: &str| -> Vec<u64> {
            events
                .iter()
                .filter(|v| v["fields"]["caller"] == caller && v["fields"]["outcome"] == outcome)
                .map(|v| {
                    v["fields"]["count"]
                        .as_u64()
                        .expect("count is a JSON number")
                })
                .collect()
        };
        let resident_ok = counts("json-test", "OK");
        assert_eq!(resident_ok.iter().sum::<u64>(), 6_000 + 9, "{text}");
        assert_eq!(
            counts("json-visitor", "OK").iter().sum::<u64>(),
            2_000,
            "{text}"
        );
        assert_eq!(counts("json-test", "UNAVAILABLE"), [1], "{text}");
        // The last flush wrote what three ways of counting one key had counted as one event.
        let last: Vec<&str> = text[before..]
            .lines()
            .filter(|l| l.contains("\"json-test\"") && l.contains("\"OK\""))
            .collect();
        assert_eq!(last.len(), 1, "{text}");
        assert!(last[0].contains("\"count\":9"), "{text}");
    }

    #[test]
    fn keys_round_trip_whatever_the_text() {
        let mut key = Vec::new();
        for (peer, caller, account) in [
            (None, "billing", "acme"),
            (Some("10.0.0.7".parse().unwrap()), "", ""),
            (Some("::1".parse().unwrap()), "a\u{1f}b\0c", "x"),
        ] {
            encode(
                &mut key,
                Code::PermissionDenied,
                peer,
                ["GetToken", caller, account, "expired"],
            );
            let event = decode(&key).unwrap();
            assert_eq!(event.reason, "expired");
            assert_eq!(event.outcome, "PERMISSION_DENIED");
            assert_eq!(event.method, "GetToken");
            assert_eq!(event.caller, caller);
            assert_eq!(event.account, account);
            assert_eq!(event.peer, peer.map(|p| p.to_string()).unwrap_or_default());
        }
    }
}
