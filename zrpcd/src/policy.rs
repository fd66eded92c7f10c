//! The access policy: who may own which names, call which services, and use
//! the broker's introspection. Pure over kernel identities (uid and gids
//! from `SO_PEERCRED` / `SO_PEERGROUPS`), so that it is tested without real
//! users; the broker asks it, it never asks the broker.
//!
//! Without a policy file the defaults hold (see `docs/security.md`): anyone
//! may call anything; a name held by one uid cannot be taken or joined by
//! another; `monitor` and the full `peers` list only for root and the
//! broker's own uid. A policy file narrows this:
//!
//! ```toml
//! # Only uid 0 and members of group "billing" may own "billing" (even while
//! # no service holds it: nobody else can squat it).
//! [[own]]
//! name = "billing"
//! users = ["root"]
//! groups = ["billing"]
//!
//! # "charge" for "alice" and group "finance"; "refund" for root only;
//! # no other method of "billing" for anyone.
//! [[call]]
//! service = "billing"
//! method = "charge"
//! users = ["alice"]
//! groups = ["finance"]
//! [[call]]
//! service = "billing"
//! method = "refund"
//! users = ["root"]
//!
//! # Who may use the broker's introspection (default: root and the
//! # broker's uid for monitor and peers, everyone for stats).
//! [introspect]
//! monitor = { users = ["root"], groups = ["adm"] }
//! stats = { users = ["*"] }
//! ```
//!
//! Names and services are exact, or a prefix ending in `*` (`"billing.*"`,
//! `"*"`). A name matched by an `own` rule may be owned only by the
//! principals of the rules that match it; a call to a service matched by a
//! `call` rule only by the principals of the matching rules whose method
//! matches too: rules add up (a call is allowed if any rule matching its
//! service and method names the caller; there are no deny rules). Calls to
//! the broker's own `zrpcd.*` methods are governed by `[introspect]`, not
//! by `call` rules. Everything else keeps the defaults.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;

/// Default policy file.
pub const DEFAULT_POLICY_PATH: &str = "/etc/zrpc/policy.toml";

/// Who a connection is, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Identity<'a> {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids (`SO_PEERGROUPS`), if the kernel gave them.
    pub groups: &'a [u32],
}

impl Identity<'_> {
    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// A set of users and groups a rule applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principals {
    any: bool,
    uids: BTreeSet<u32>,
    gids: BTreeSet<u32>,
}

impl Principals {
    fn only(uids: &[u32]) -> Principals {
        Principals {
            any: false,
            uids: uids.iter().copied().collect(),
            gids: BTreeSet::new(),
        }
    }

    fn everyone() -> Principals {
        Principals {
            any: true,
            ..Principals::default()
        }
    }

    /// Whether `who` is one of them.
    pub fn contains(&self, who: &Identity) -> bool {
        self.any || self.uids.contains(&who.uid) || self.gids.iter().any(|&g| who.in_group(g))
    }
}

/// A name pattern: exact, or a prefix (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(s: &str) -> Result<Pattern, String> {
        match s.strip_suffix('*') {
            Some(prefix) if !prefix.contains('*') => Ok(Pattern::Prefix(prefix.to_owned())),
            None if !s.is_empty() && !s.contains('*') => Ok(Pattern::Exact(s.to_owned())),
            _ => Err(format!(
                "{s:?} is not a pattern: use an exact name, or a prefix ending in a single '*'"
            )),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(e) => e == name,
            Pattern::Prefix(p) => name.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone)]
struct OwnRule {
    name: Pattern,
    who: Principals,
    shared: bool,
}

#[derive(Debug, Clone)]
struct CallRule {
    service: Pattern,
    method: Pattern,
    who: Principals,
}

/// The broker's introspection methods a policy controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Introspection {
    /// `zrpcd.monitor`: every call, live.
    Monitor,
    /// `zrpcd.peers` with every connection's pid, uid and agent.
    Peers,
    /// `zrpcd.stats`.
    Stats,
}

/// A validated access policy.
#[derive(Debug, Clone)]
pub struct Policy {
    own: Vec<OwnRule>,
    call: Vec<CallRule>,
    monitor: Principals,
    peers: Principals,
    stats: Principals,
    /// Per-uid quotas set by the file (the rest are defaults).
    quota: crate::quota::QuotaOverrides,
    /// Where it came from (for messages).
    source: String,
}

impl Policy {
    /// The defaults (no policy file); `broker_uid` is the uid the broker
    /// runs as, privileged like root.
    pub fn default_for(broker_uid: u32) -> Policy {
        let privileged = Principals::only(&[0, broker_uid]);
        Policy {
            own: Vec::new(),
            call: Vec::new(),
            monitor: privileged.clone(),
            peers: privileged,
            stats: Principals::everyone(),
            quota: crate::quota::QuotaOverrides::default(),
            source: "the default policy".into(),
        }
    }

    /// Reads and validates a policy file; user and group names are resolved
    /// now (an unknown one is an error, never "nobody").
    pub fn load(path: &Path, broker_uid: u32) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the policy file {}: {e}", path.display()))?;
        Policy::parse(&text, &path.display().to_string(), broker_uid, &SystemNames)
    }

    /// Parses policy text (see the module docs); `source` names it in
    /// messages.
    pub fn parse(
        text: &str,
        source: &str,
        broker_uid: u32,
        names: &dyn NameResolver,
    ) -> Result<Policy, String> {
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| format!("{source}: not a valid policy: {e}"))?;
        let mut p = Policy::default_for(broker_uid);
        p.source = source.to_owned();
        p.quota = raw.quota;
        let err = |what: String| format!("{source}: {what}");
        for (i, r) in raw.own.into_iter().enumerate() {
            let at = format!("[[own]] #{}", i + 1);
            p.own.push(OwnRule {
                name: Pattern::parse(&r.name).map_err(|e| err(format!("{at}: name {e}")))?,
                who: principals(&r.users, &r.groups, names)
                    .map_err(|e| err(format!("{at}: {e}")))?,
                shared: r.shared.unwrap_or(true),
            });
        }
        for (i, r) in raw.call.into_iter().enumerate() {
            let at = format!("[[call]] #{}", i + 1);
            p.call.push(CallRule {
                service: Pattern::parse(&r.service)
                    .map_err(|e| err(format!("{at}: service {e}")))?,
                method: Pattern::parse(r.method.as_deref().unwrap_or("*"))
                    .map_err(|e| err(format!("{at}: method {e}")))?,
                who: principals(&r.users, &r.groups, names)
                    .map_err(|e| err(format!("{at}: {e}")))?,
            });
        }
        if let Some(i) = raw.introspect {
            let set = |w: Option<RawWho>, what: &str, dflt: Principals| match w {
                None => Ok(dflt),
                Some(w) => principals(&w.users, &w.groups, names)
                    .map_err(|e| err(format!("[introspect] {what}: {e}"))),
            };
            p.monitor = set(i.monitor, "monitor", p.monitor.clone())?;
            p.peers = set(i.peers, "peers", p.peers.clone())?;
            p.stats = set(i.stats, "stats", p.stats.clone())?;
        }
        Ok(p)
    }

    /// The per-uid quotas the file sets.
    pub fn quota(&self) -> crate::quota::QuotaOverrides {
        self.quota
    }

    /// Where the policy came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Number of rules (for logs).
    pub fn rules(&self) -> usize {
        self.own.len() + self.call.len()
    }

    /// Whether `who` may own `name` (as `shared`) by the rules of the
    /// policy file. Names no rule mentions are open (the broker still keeps
    /// names from being taken or joined across uids).
    pub fn may_own(&self, who: &Identity, name: &str, shared: bool) -> Result<(), String> {
        let mut reserved = false;
        for r in self.own.iter().filter(|r| r.name.matches(name)) {
            reserved = true;
            if r.who.contains(who) && (r.shared || !shared) {
                return Ok(());
            }
        }
        if reserved {
            return Err(format!(
                "the name {name:?} is reserved by {} for other users (uid {} may not own it{})",
                self.source,
                who.uid,
                if shared { " as shared" } else { "" }
            ));
        }
        Ok(())
    }

    /// Whether an `[[own]]` rule mentions `name` (its rules then say who
    /// may own it, free or not).
    pub fn mentions(&self, name: &str) -> bool {
        self.own.iter().any(|r| r.name.matches(name))
    }

    /// Whether `[[own]]` rules cover every name `pattern` can match (a
    /// pattern of the NATS bridge's `[export]` or `[import]`: exact, or a
    /// prefix ending in `*`, which only a prefix rule covers whole).
    pub fn covers(&self, pattern: &str) -> bool {
        match pattern.strip_suffix('*') {
            Some(prefix) => self
                .own
                .iter()
                .any(|r| matches!(&r.name, Pattern::Prefix(p) if prefix.starts_with(p.as_str()))),
            None => self.mentions(pattern),
        }
    }

    /// Whether any `[[own]]` rule reserves names.
    pub fn reserves_names(&self) -> bool {
        !self.own.is_empty()
    }

    /// Whether any rule guards calls (without one, every call is allowed
    /// and the call path skips the check).
    #[inline]
    pub fn guards_calls(&self) -> bool {
        !self.call.is_empty()
    }

    /// Whether `who` may call `service.method`.
    pub fn may_call(&self, who: &Identity, service: &str, method: &str) -> Result<(), String> {
        if self.call.is_empty() {
            return Ok(());
        }
        let mut guarded = false;
        for r in self.call.iter().filter(|r| r.service.matches(service)) {
            guarded = true;
            if r.method.matches(method) && r.who.contains(who) {
                return Ok(());
            }
        }
        if guarded {
            return Err(format!(
                "{} does not allow uid {} to call {service}.{method}",
                self.source, who.uid
            ));
        }
        Ok(())
    }

    /// Whether `who` may use `what`.
    pub fn may_introspect(&self, who: &Identity, what: Introspection) -> bool {
        match what {
            Introspection::Monitor => self.monitor.contains(who),
            Introspection::Peers => self.peers.contains(who),
            Introspection::Stats => self.stats.contains(who),
        }
    }
}

/// Resolves user and group names (the system's databases in the broker, a
/// table in tests).
pub trait NameResolver {
    /// The uid of user `name`.
    fn uid(&self, name: &str) -> Option<u32>;
    /// The gid of group `name`.
    fn gid(&self, name: &str) -> Option<u32>;
}

/// `getpwnam_r` / `getgrnam_r`.
pub struct SystemNames;

impl NameResolver for SystemNames {
    fn uid(&self, name: &str) -> Option<u32> {
        let c = std::ffi::CString::new(name).ok()?;
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        // SAFETY: a zeroed passwd is a valid out-parameter; getpwnam_r
        // writes into it and `buf` only, both live for the call, and we
        // read `pw_uid` only when it reports success with a result.
        unsafe {
            let mut pw: libc::passwd = std::mem::zeroed();
            let mut out: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out);
            (rc == 0 && !out.is_null()).then_some(pw.pw_uid)
        }
    }

    fn gid(&self, name: &str) -> Option<u32> {
        let c = std::ffi::CString::new(name).ok()?;
        let mut buf = vec![0 as libc::c_char; 64 * 1024];
        // SAFETY: as in `uid`, for getgrnam_r and a group record.
        unsafe {
            let mut gr: libc::group = std::mem::zeroed();
            let mut out: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out);
            (rc == 0 && !out.is_null()).then_some(gr.gr_gid)
        }
    }
}

/// A user or group: a name, a number, or `"*"` (everyone).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawId {
    Num(u32),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    own: Vec<RawOwn>,
    #[serde(default)]
    call: Vec<RawCall>,
    introspect: Option<RawIntrospect>,
    #[serde(default)]
    quota: crate::quota::QuotaOverrides,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOwn {
    name: String,
    #[serde(default)]
    users: Vec<RawId>,
    #[serde(default)]
    groups: Vec<RawId>,
    shared: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCall {
    service: String,
    method: Option<String>,
    #[serde(default)]
    users: Vec<RawId>,
    #[serde(default)]
    groups: Vec<RawId>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntrospect {
    monitor: Option<RawWho>,
    peers: Option<RawWho>,
    stats: Option<RawWho>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWho {
    #[serde(default)]
    users: Vec<RawId>,
    #[serde(default)]
    groups: Vec<RawId>,
}

fn principals(
    users: &[RawId],
    groups: &[RawId],
    names: &dyn NameResolver,
) -> Result<Principals, String> {
    let mut p = Principals::default();
    for u in users {
        match u {
            RawId::Num(n) => {
                p.uids.insert(*n);
            }
            RawId::Name(s) if s == "*" => p.any = true,
            RawId::Name(s) => {
                let uid = names.uid(s).ok_or_else(|| format!("unknown user {s:?}"))?;
                p.uids.insert(uid);
            }
        }
    }
    for g in groups {
        match g {
            RawId::Num(n) => {
                p.gids.insert(*n);
            }
            RawId::Name(s) if s == "*" => p.any = true,
            RawId::Name(s) => {
                let gid = names.gid(s).ok_or_else(|| format!("unknown group {s:?}"))?;
                p.gids.insert(gid);
            }
        }
    }
    if !p.any && p.uids.is_empty() && p.gids.is_empty() {
        return Err("a rule needs at least one user or group (\"*\" for everyone)".into());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Table;
    impl NameResolver for Table {
        fn uid(&self, name: &str) -> Option<u32> {
            [("root", 0), ("alice", 1001), ("bob", 1002)]
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, u)| u)
        }
        fn gid(&self, name: &str) -> Option<u32> {
            [("billing", 500), ("finance", 600)]
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, g)| g)
        }
    }

    fn who(uid: u32, gid: u32, groups: &[u32]) -> Identity<'_> {
        Identity { uid, gid, groups }
    }

    const EXAMPLE: &str = r#"
        [[own]]
        name = "billing"
        users = ["root"]
        groups = ["billing"]
        [[own]]
        name = "team.*"
        users = [1001]
        shared = false
        [[call]]
        service = "billing"
        users = ["alice"]
        groups = ["finance"]
        [[call]]
        service = "billing"
        method = "refund"
        users = ["root"]
        [introspect]
        monitor = { groups = ["billing"] }
        stats = { users = ["root"] }
    "#;

    #[test]
    fn defaults() {
        let p = Policy::default_for(999);
        let alice = who(1001, 1001, &[]);
        assert!(p.may_own(&alice, "anything", true).is_ok());
        assert!(p.may_call(&alice, "x", "y").is_ok());
        assert!(!p.may_introspect(&alice, Introspection::Monitor));
        assert!(!p.may_introspect(&alice, Introspection::Peers));
        assert!(p.may_introspect(&alice, Introspection::Stats));
        for privileged in [who(0, 0, &[]), who(999, 5, &[])] {
            assert!(p.may_introspect(&privileged, Introspection::Monitor));
            assert!(p.may_introspect(&privileged, Introspection::Peers));
        }
    }

    #[test]
    fn quotas_parse_and_out_of_range_values_are_refused() {
        let p = Policy::parse(
            "[quota]\nintrospection_per_second = 7\nnames = 3\n",
            "test",
            0,
            &Table,
        )
        .expect("valid");
        assert_eq!(p.quota().introspection_per_second, Some(7));
        assert_eq!(p.quota().names, Some(3));
        assert_eq!(
            Policy::default_for(0).quota().introspection_per_second,
            None
        );
        for bad in ["-1", "4294967296", "\"fast\""] {
            let text = format!("[quota]\nintrospection_per_second = {bad}\n");
            assert!(Policy::parse(&text, "test", 0, &Table).is_err(), "{bad}");
        }
    }

    /// The bridge warns about patterns no rule covers whole: an exact rule
    /// covers that name only, a prefix rule the prefixes under it.
    #[test]
    fn patterns_are_covered_by_rules_that_match_all_their_names() {
        let p = Policy::parse(EXAMPLE, "test", 0, &Table).expect("valid");
        assert!(p.covers("billing"));
        assert!(!p.covers("billing*"), "an exact rule covers no prefix");
        assert!(!p.covers("bill*"));
        assert!(p.covers("team.*") && p.covers("team.eu.*") && p.covers("team.x"));
        assert!(!p.covers("team*"), "team.* leaves teamwork free");
        assert!(!p.covers("calc"));
    }

    #[test]
    fn own_rules_reserve_names() {
        let p = Policy::parse(EXAMPLE, "test", 0, &Table).expect("valid");
        assert_eq!(p.rules(), 4);
        let (root, alice, bob) = (
            who(0, 0, &[]),
            who(1001, 1001, &[]),
            who(1002, 1002, &[500]),
        );
        assert!(p.may_own(&root, "billing", false).is_ok());
        assert!(
            p.may_own(&bob, "billing", true).is_ok(),
            "member of group billing"
        );
        let e = p.may_own(&alice, "billing", false).expect_err("reserved");
        assert!(e.contains("reserved") && e.contains("1001"), "{e}");
        assert!(p.may_own(&alice, "team.a", false).is_ok());
        assert!(p.may_own(&alice, "team.a", true).is_err(), "not as shared");
        assert!(p.may_own(&bob, "team.b", false).is_err());
        assert!(
            p.may_own(&bob, "free", true).is_ok(),
            "names without rules are open"
        );
    }

    #[test]
    fn call_rules_guard_services_and_methods() {
        let p = Policy::parse(EXAMPLE, "test", 0, &Table).expect("valid");
        let (root, alice, bob, fin) = (
            who(0, 0, &[]),
            who(1001, 1001, &[]),
            who(1002, 1002, &[]),
            who(1003, 1003, &[600]),
        );
        assert!(p.may_call(&alice, "billing", "charge").is_ok());
        assert!(p.may_call(&fin, "billing", "charge").is_ok());
        assert!(p.may_call(&root, "billing", "refund").is_ok());
        assert!(
            p.may_call(&root, "billing", "charge").is_err(),
            "only refund for root"
        );
        let e = p
            .may_call(&bob, "billing", "charge")
            .expect_err("not allowed");
        assert!(e.contains("1002") && e.contains("billing.charge"), "{e}");
        assert!(
            p.may_call(&bob, "echo", "echo").is_ok(),
            "unguarded service"
        );
        assert!(p.may_introspect(&who(7, 500, &[]), Introspection::Monitor));
        assert!(
            !p.may_introspect(&root, Introspection::Monitor),
            "replaced default"
        );
        assert!(!p.may_introspect(&alice, Introspection::Stats));
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        for (text, want) in [
            (
                "[[own]]\nname = \"x\"\nusers = [\"nobody-such\"]",
                "unknown user",
            ),
            (
                "[[own]]\nname = \"x\"\ngroups = [\"nogroup-such\"]",
                "unknown group",
            ),
            ("[[own]]\nname = \"x\"", "at least one user"),
            ("[[own]]\nname = \"a*b\"\nusers = [0]", "not a pattern"),
            (
                "[[call]]\nservice = \"s\"\nmethod = \"\"\nusers = [0]",
                "not a pattern",
            ),
            ("[[own]]\nnme = \"x\"\nusers = [0]", "unknown field"),
            ("[[own]\n", "not a valid policy"),
        ] {
            let e = Policy::parse(text, "f.toml", 0, &Table).expect_err(text);
            assert!(e.contains(want) && e.starts_with("f.toml"), "{text}: {e}");
        }
    }
}
