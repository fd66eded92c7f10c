//! Names kept for their user for a while after their last instance left.
//!
//! A name the policy file does not reserve is first come, first served.
//! Without more, a service that restarts (crashed, stopped by systemd, or
//! cut off by the heartbeat) leaves its name free for a moment, and
//! another local user who registers it first takes the calls made to it
//! from then on, including the ones waiting for the service to come back.
//! So when a name loses its last instance, the broker keeps it for that
//! instance's user for `--name-grace` (default
//! [`DEFAULT_NAME_GRACE`](crate::config::DEFAULT_NAME_GRACE)): within it,
//! only that user may register it again (`Broker::may_own`). Names the
//! policy file mentions are left to its rules.
//!
//! Kept names are bounded: at most a user's `names` quota of them per user
//! (root: no per-user bound; past it the user's oldest go first) and
//! `--max-names` in all; past that bound, the user keeping the most gives
//! up its oldest, so that users keeping many names (or many uids' worth)
//! cannot push out another user's one. Each release costs amortised O(1)
//! (O(users keeping names) past the bound in all), and what has expired is
//! forgotten on the broker's heartbeat tick ([`Reserved::prune`]). The
//! broker's own NATS bridge is not held to kept names (it forwards for the
//! broker, docs/bridge.md), and does not keep its imported names.
//!
//! Kept across a restart of the broker too: a restart drops every
//! connection at once, and the services come back within their reconnect
//! backoff (up to a second), while another user connecting in a loop would
//! be first. So the broker writes the names held and kept, each with its
//! user, to [`STATE_FILE`] in its socket directory (`0600`, on the
//! heartbeat tick when they changed, and at shutdown; [`save`]), and a
//! broker starting keeps each for its user for the grace ([`load`]).
//!
//! Private state behind a narrow API: [`Reserved::release`] when a name
//! loses its last instance, [`Reserved::kept_for`] when a connection
//! registers one, [`Reserved::taken`] once it did, [`Reserved::prune`]
//! now and then.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::hashing::PeerKeyedMap;

/// The file in the socket directory that keeps the names and their users
/// across a restart (see the module docs).
pub const STATE_FILE: &str = "zrpcd.names";

/// The first line of [`STATE_FILE`] (its format: then one `uid name` a
/// line).
const STATE_HEADER: &str = "# zrpcd names v1: uid name";

/// Largest [`STATE_FILE`] read: 65,536 names held and as many kept, of
/// 128 bytes (`zrpc_proto::MAX_NAME_LEN`) and a uid each, fit. A longer
/// file is read up to it (its last, cut, line dropped).
const STATE_MAX_BYTES: u64 = 32 << 20;

/// Writes `names` (name and user) to `path` in place of what it held:
/// a temporary file, readable by the broker's user only, renamed over it.
/// The temporary file is made anew (`O_EXCL`, `O_NOFOLLOW`): a link or a
/// file left there is removed first, never written through.
pub fn save<'a>(path: &Path, names: impl Iterator<Item = (&'a str, u32)>) -> std::io::Result<()> {
    let tmp = path.with_extension("names.tmp");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let mut w = std::io::BufWriter::new(f);
    writeln!(w, "{STATE_HEADER}")?;
    for (name, uid) in names {
        writeln!(w, "{uid} {name}")?;
    }
    w.into_inner().map_err(|e| e.into_error())?;
    std::fs::rename(&tmp, path)
}

/// The names and users [`save`] wrote to `path` (none if it does not
/// exist, or is not a regular file of this format); lines that are not a
/// uid and a valid name are skipped.
pub fn load(path: &Path) -> std::io::Result<Vec<(String, u32)>> {
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(f, STATE_MAX_BYTES), &mut text)?;
    Ok(parse(&text))
}

/// The names of a [`STATE_FILE`]'s text: none unless it begins with
/// [`STATE_HEADER`]; only whole lines (a line cut by the size bound is
/// dropped: `1000 billing.v2` must not come back as `1000 billing`).
fn parse(text: &str) -> Vec<(String, u32)> {
    let Some(body) = text
        .strip_prefix(STATE_HEADER)
        .and_then(|t| t.strip_prefix('\n'))
    else {
        return Vec::new();
    };
    let whole = body.rfind('\n').map_or("", |end| &body[..end]);
    whole
        .lines()
        .filter_map(|l| {
            let (uid, name) = l.split_once(' ')?;
            let uid = uid.parse::<u32>().ok()?;
            zrpc_proto::validate_name(name).ok()?;
            Some((name.to_owned(), uid))
        })
        .collect()
}

/// The names kept for their last user (see the module docs).
#[derive(Debug, Default)]
pub struct Reserved {
    /// How long a name is kept.
    grace: Duration,
    /// Most names kept in all.
    max: usize,
    /// Each kept name: for whom, until when.
    by_name: PeerKeyedMap<Rc<str>, (u32, Instant)>,
    /// Each user's kept names, oldest first.
    by_uid: HashMap<u32, Kept>,
}

/// One user's kept names.
#[derive(Debug, Default)]
struct Kept {
    /// Oldest first. An entry whose name was taken since (or kept again,
    /// later) no longer matches `by_name`: it is stale, skipped when it
    /// comes out, and dropped when stale entries pass the live ones by
    /// [`STALE_SLACK`] (so that a user registering and releasing one name
    /// in a loop holds no more than that).
    queue: VecDeque<(Instant, Rc<str>)>,
    /// The entries of `queue` that are not stale: what the bounds count.
    live: usize,
}

/// Stale entries a user's queue may hold past twice its live ones before
/// it is compacted (amortised O(1) per release).
const STALE_SLACK: usize = 64;

impl Reserved {
    /// Names kept for `grace` (zero: none), at most `max` of them.
    pub fn new(grace: Duration, max: usize) -> Reserved {
        Reserved {
            grace,
            max,
            ..Reserved::default()
        }
    }

    /// Names kept now (expired ones not yet pruned included).
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no name is kept.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The user `name` is kept for at `now`, and since when it has been.
    pub fn kept_for(&self, name: &str, now: Instant) -> Option<(u32, Duration)> {
        let &(uid, until) = self.by_name.get(name)?;
        (until > now).then(|| (uid, self.grace.saturating_sub(until - now)))
    }

    /// `name` lost its last instance, of user `uid`: kept for that user
    /// until `now` + the grace. `per_uid`: the user's bound (`None`: root).
    pub fn release(&mut self, name: &str, uid: u32, now: Instant, per_uid: Option<usize>) {
        if self.grace.is_zero() || self.max == 0 {
            return;
        }
        self.taken(name);
        let until = now + self.grace;
        let name: Rc<str> = Rc::from(name);
        self.by_name.insert(name.clone(), (uid, until));
        let mine = self.by_uid.entry(uid).or_default();
        mine.queue.push_back((until, name));
        mine.live += 1;
        if let Some(max) = per_uid {
            while mine.live > max {
                if !pop_oldest(&mut self.by_name, uid, mine) {
                    break;
                }
            }
        }
        if mine.queue.len() > 2 * mine.live + STALE_SLACK {
            let by_name = &self.by_name;
            mine.queue
                .retain(|(until, n)| by_name.get(n) == Some(&(uid, *until)));
        }
        // Past the bound in all, the user keeping the most gives one up.
        while self.by_name.len() > self.max {
            let Some((&most, _)) = self
                .by_uid
                .iter()
                .filter(|(_, k)| k.live > 0)
                .max_by_key(|(&u, k)| (k.live, std::cmp::Reverse(u)))
            else {
                break;
            };
            let Some(kept) = self.by_uid.get_mut(&most) else {
                break;
            };
            let popped = pop_oldest(&mut self.by_name, most, kept);
            if kept.queue.is_empty() {
                self.by_uid.remove(&most);
            }
            if !popped {
                break;
            }
        }
    }

    /// The names kept at `now`, with their users.
    pub fn iter(&self, now: Instant) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.by_name
            .iter()
            .filter(move |(_, &(_, until))| until > now)
            .map(|(name, &(uid, _))| (&**name, uid))
    }

    /// `name` was registered again (by the user it was kept for, or after
    /// its grace): no longer kept.
    pub fn taken(&mut self, name: &str) {
        if self.by_name.is_empty() {
            return;
        }
        if let Some((uid, _)) = self.by_name.remove(name) {
            if let Some(k) = self.by_uid.get_mut(&uid) {
                k.live = k.live.saturating_sub(1);
            }
        }
    }

    /// Forgets the names whose grace ended at `now`; whether any was
    /// kept until then.
    pub fn prune(&mut self, now: Instant) -> bool {
        let before = self.by_name.len();
        let by_name = &mut self.by_name;
        self.by_uid.retain(|&uid, k| {
            while k.queue.front().is_some_and(|(until, _)| *until <= now) {
                if let Some(first) = k.queue.pop_front() {
                    if forget(by_name, uid, first) {
                        k.live = k.live.saturating_sub(1);
                    }
                }
            }
            !k.queue.is_empty()
        });
        self.by_name.len() != before
    }
}

/// Forgets `uid`'s oldest kept name (skipping stale entries); whether
/// there was one.
fn pop_oldest(by_name: &mut PeerKeyedMap<Rc<str>, (u32, Instant)>, uid: u32, k: &mut Kept) -> bool {
    while let Some(first) = k.queue.pop_front() {
        if forget(by_name, uid, first) {
            k.live = k.live.saturating_sub(1);
            return true;
        }
    }
    false
}

/// Removes `name` from `by_name` if it is still kept for `uid` until
/// `until` (the entry is not stale); whether it was.
fn forget(
    by_name: &mut PeerKeyedMap<Rc<str>, (u32, Instant)>,
    uid: u32,
    (until, name): (Instant, Rc<str>),
) -> bool {
    if by_name.get(&name) == Some(&(uid, until)) {
        by_name.remove(&name);
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    #[test]
    fn a_name_is_kept_for_its_user_for_the_grace() {
        let t0 = Instant::now();
        let mut r = Reserved::new(GRACE, 100);
        assert_eq!(r.kept_for("a", t0), None);
        r.release("a", 1000, t0, Some(10));
        let later = t0 + Duration::from_secs(3);
        assert_eq!(r.kept_for("a", later), Some((1000, Duration::from_secs(3))));
        assert_eq!(r.kept_for("a", t0 + GRACE), None, "the grace ended");
        r.prune(t0 + GRACE - Duration::from_millis(1));
        assert_eq!(r.len(), 1, "not yet expired");
        r.prune(t0 + GRACE);
        assert!(r.is_empty());
    }

    #[test]
    fn a_zero_grace_keeps_nothing() {
        let t0 = Instant::now();
        let mut r = Reserved::new(Duration::ZERO, 100);
        r.release("a", 1000, t0, None);
        assert_eq!(r.kept_for("a", t0), None);
        assert!(r.is_empty());
    }

    #[test]
    fn a_name_taken_again_is_no_longer_kept_and_its_old_entry_is_skipped() {
        let t0 = Instant::now();
        let mut r = Reserved::new(GRACE, 100);
        r.release("a", 1000, t0, Some(10));
        r.taken("a");
        assert_eq!(r.kept_for("a", t0), None);
        // Released again later, by another user: the first user's entry,
        // when it expires, does not forget the second's.
        let t1 = t0 + Duration::from_secs(5);
        r.release("a", 2000, t1, Some(10));
        r.prune(t0 + GRACE);
        assert_eq!(
            r.kept_for("a", t0 + GRACE),
            Some((2000, Duration::from_secs(5)))
        );
        r.prune(t1 + GRACE);
        assert!(r.is_empty());
    }

    #[test]
    fn a_user_past_its_bound_gives_up_its_oldest() {
        let t0 = Instant::now();
        let mut r = Reserved::new(GRACE, 100);
        for i in 0..5u32 {
            r.release(
                &format!("n{i}"),
                1000,
                t0 + Duration::from_millis(i.into()),
                Some(3),
            );
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.kept_for("n1", t0), None);
        assert!(r.kept_for("n2", t0).is_some());
        // Root has no per-user bound.
        for i in 0..5u32 {
            r.release(&format!("r{i}"), 0, t0, None);
        }
        assert_eq!(r.len(), 8);
    }

    #[test]
    fn past_the_bound_in_all_the_user_keeping_most_gives_up_first() {
        let t0 = Instant::now();
        let mut r = Reserved::new(GRACE, 10);
        // A user keeps one name; another fills the rest, and more.
        r.release("victim", 1000, t0, Some(100));
        for i in 0..50u32 {
            let at = t0 + Duration::from_millis(1 + u64::from(i));
            r.release(&format!("x{i}"), 2000 + i % 3, at, Some(100));
        }
        assert_eq!(r.len(), 10);
        assert_eq!(
            r.kept_for("victim", t0).map(|(u, _)| u),
            Some(1000),
            "the user keeping one name keeps it"
        );
        // The three others share the rest evenly, newest kept.
        assert!(r.kept_for("x49", t0).is_some());
        assert_eq!(r.kept_for("x0", t0), None);
    }

    #[test]
    fn a_name_flapping_does_not_push_out_the_users_other_names_nor_pile_up() {
        let t0 = Instant::now();
        let mut r = Reserved::new(GRACE, 1_000_000);
        r.release("kept", 1000, t0, Some(4));
        for i in 0..10_000u64 {
            let at = t0 + Duration::from_micros(i);
            r.release("flap", 1000, at, Some(4));
            r.taken("flap");
        }
        assert!(
            r.kept_for("kept", t0).is_some(),
            "pushed out by stale entries"
        );
        let k = &r.by_uid[&1000];
        assert_eq!(k.live, 1);
        assert!(
            k.queue.len() <= 2 * k.live + STALE_SLACK + 1,
            "{}",
            k.queue.len()
        );
        // Root has no per-user bound, and is compacted all the same.
        for i in 0..10_000u64 {
            r.release("rflap", 0, t0 + Duration::from_micros(i), None);
        }
        let k = &r.by_uid[&0];
        assert_eq!(k.live, 1);
        assert!(
            k.queue.len() <= 2 * k.live + STALE_SLACK + 1,
            "{}",
            k.queue.len()
        );
    }

    #[test]
    fn the_state_file_round_trips_and_bad_lines_are_skipped() {
        let dir = std::env::temp_dir().join(format!("zrpcd-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(STATE_FILE);
        assert!(load(&path).expect("no file").is_empty());
        save(&path, [("billing", 1000), ("a.b-c", 0)].into_iter()).expect("save");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("metadata").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let mut got = load(&path).expect("load");
        got.sort();
        assert_eq!(got, vec![("a.b-c".into(), 0), ("billing".into(), 1000)]);
        let bad = format!("{STATE_HEADER}\n1000\nx billing\n-1 billing\n1000 bad name\n1000 ok\n");
        assert_eq!(parse(&bad), vec![("ok".into(), 1000)]);
        // Another format, or none: nothing.
        assert!(parse("# zrpcd names v2\n1000 ok\n").is_empty());
        assert!(parse("1000 ok\n").is_empty());
        // A last line cut by the size bound is dropped, not shortened.
        let cut = format!("{STATE_HEADER}\n1000 ok\n1000 billing");
        assert_eq!(parse(&cut), vec![("ok".into(), 1000)]);
        // A link where the temporary file goes is replaced, not followed.
        let target = dir.join("target");
        std::fs::write(&target, "untouched").expect("target");
        let tmp = path.with_extension("names.tmp");
        std::os::unix::fs::symlink(&target, &tmp).expect("symlink");
        save(&path, [("x", 1)].into_iter()).expect("save over a link");
        assert_eq!(
            std::fs::read_to_string(&target).expect("target"),
            "untouched"
        );
        assert_eq!(load(&path).expect("load"), vec![("x".into(), 1)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
