//! The peers table: one entry per live connection.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::rc::Rc;
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::queue::PeerIo;
use crate::quota::Usage;

/// Broker-assigned connection id.
pub type PeerId = u64;

/// Credentials of the process at the other end, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Creds {
    /// Process id (0 if unknown).
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl Creds {
    /// These credentials as the protocol's [`zrpc_proto::Caller`] (a pid
    /// the kernel could not give is 0).
    pub fn caller(&self) -> zrpc_proto::Caller {
        zrpc_proto::Caller {
            uid: self.uid,
            gid: self.gid,
            pid: u32::try_from(self.pid).unwrap_or(0),
        }
    }
}

/// Reads the supplementary groups of the process at the other end of
/// `fd` (`SO_PEERGROUPS`, Linux 4.13+); empty if unavailable.
pub fn peer_groups(fd: std::os::fd::RawFd) -> Box<[u32]> {
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`,
        // which has that many, and reports how many it wrote (or needs).
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / 4);
            return groups.into_boxed_slice();
        }
        let need = len as usize / 4;
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE)
            && need > groups.len()
            && need <= 65_536
        {
            groups.resize(need, 0);
            continue;
        }
        return Box::default();
    }
}

/// One connection. Its fields are private: the broker changes them only
/// through the methods below, which keep each counter paired with its
/// release (and the user's account, [`crate::quota::Usage`], in step with
/// the connection's own counters).
#[derive(Debug)]
pub struct Peer {
    /// Connection id.
    id: PeerId,
    /// Shared with the writer task.
    io: Rc<PeerIo>,
    /// `Hello` received.
    ready: bool,
    /// Instance id from `Hello`.
    instance: u64,
    /// Agent string from `Hello`.
    agent: String,
    /// From `SO_PEERCRED`, never from what the peer claims.
    creds: Creds,
    /// Supplementary groups from `SO_PEERGROUPS` (empty if the kernel gave
    /// none).
    groups: Box<[u32]>,
    /// What this peer's uid holds, all its connections together.
    user: Rc<Usage>,
    /// When the connection was accepted.
    since: Instant,
    /// Names held.
    names: Vec<Box<str>>,
    /// Calls delivered to this peer (as a service) not yet answered.
    outstanding: u32,
    /// Calls made by this peer (as a client) not yet answered.
    calling: u32,
    /// Payload bytes of those calls, kept by the broker.
    calling_bytes: usize,
    /// Requests this peer answered (as a service).
    served: u64,
    /// Requests delivered to this peer that ended in an error or timeout.
    failed: u64,
    /// Calls this peer made.
    calls_made: u64,
    /// When a frame last arrived from this peer.
    last_seen: Instant,
    /// A limit hit by this peer was already logged at warn level.
    limit_logged: bool,
    /// Payload descriptors received from this peer that the broker holds
    /// (see [`crate::payload::FdHold`]).
    fds: Rc<std::cell::Cell<usize>>,
    /// When the frame this peer is in the middle of sending began to
    /// arrive (None: no partial frame).
    partial_since: Option<Instant>,
    /// Read buffer bytes held for that partial frame.
    partial_bytes: usize,
}

impl Peer {
    /// Connection id.
    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The queue and socket shared with the connection's tasks.
    pub fn io(&self) -> &Rc<PeerIo> {
        &self.io
    }

    /// Whether its `Hello` was received.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Instance id from `Hello` (0 before it).
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Agent string from `Hello`.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// Credentials from the kernel.
    pub fn creds(&self) -> Creds {
        self.creds
    }

    /// Who the peer is, for the access policy.
    pub fn identity(&self) -> crate::policy::Identity<'_> {
        crate::policy::Identity {
            uid: self.creds.uid,
            gid: self.creds.gid,
            groups: &self.groups,
        }
    }

    /// What this peer's uid holds, all its connections together.
    pub fn user(&self) -> &Usage {
        &self.user
    }

    /// Its user's account, as a handle.
    pub fn user_rc(&self) -> &Rc<Usage> {
        &self.user
    }

    /// The count of payload descriptors received from it that the broker
    /// holds.
    pub fn fds(&self) -> &Rc<std::cell::Cell<usize>> {
        &self.fds
    }

    /// When the connection was accepted.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Names held, in the order they were registered.
    pub fn names(&self) -> &[Box<str>] {
        &self.names
    }

    /// Calls delivered to this peer (as a service) not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// Calls made by this peer (as a client) not yet answered.
    pub fn calling(&self) -> u32 {
        self.calling
    }

    /// Payload bytes of those calls, kept by the broker.
    pub fn calling_bytes(&self) -> usize {
        self.calling_bytes
    }

    /// Requests this peer answered (as a service).
    pub fn served(&self) -> u64 {
        self.served
    }

    /// Requests delivered to this peer that ended in an error or timeout.
    pub fn failed(&self) -> u64 {
        self.failed
    }

    /// Calls this peer made (refused ones included).
    pub fn calls_made(&self) -> u64 {
        self.calls_made
    }

    /// When a frame last arrived from this peer.
    pub fn last_seen(&self) -> Instant {
        self.last_seen
    }

    /// When its partly received frame began to arrive (None: no partial
    /// frame).
    pub fn partial_since(&self) -> Option<Instant> {
        self.partial_since
    }

    /// Read buffer bytes held for its partly received frame.
    pub fn partial_bytes(&self) -> usize {
        self.partial_bytes
    }

    /// A service: holds a name or has calls to answer.
    pub fn is_serving(&self) -> bool {
        !self.names.is_empty() || self.outstanding != 0
    }

    /// Requests written to this service and not answered yet (the ones
    /// still in its queue are not in its hands; the queue also holds other
    /// frames, hence the floor at zero).
    pub fn requests_in_hand(&self) -> u32 {
        self.outstanding
            .saturating_sub(self.io.queue.borrow().queued_frames())
    }

    /// `Hello` received: the peer is ready, with what it says it is.
    pub(crate) fn greet(&mut self, instance: u64, agent: &str) {
        self.ready = true;
        self.instance = instance;
        self.agent = agent.chars().take(256).collect();
    }

    /// A frame arrived from this peer at `now`.
    pub(crate) fn saw(&mut self, now: Instant) {
        self.last_seen = now;
    }

    /// Records that a refusal is logged; true the first time (logged at
    /// warn level then, at debug level after).
    pub(crate) fn first_refusal(&mut self) -> bool {
        !std::mem::replace(&mut self.limit_logged, true)
    }

    /// Counts a call this peer made (accepted or not).
    pub(crate) fn count_call(&mut self) {
        self.calls_made += 1;
    }

    /// Charges an accepted call of `size` payload bytes to this peer and
    /// its user, until [`Peer::release_call`] with the same size (or the
    /// peer's removal, which releases all of them, [`Peers::remove`]).
    pub(crate) fn charge_call(&mut self, size: usize) {
        self.calling += 1;
        self.calling_bytes += size;
        self.user.charge_call(size);
    }

    /// Releases a call charged by [`Peer::charge_call`].
    pub(crate) fn release_call(&mut self, size: usize) {
        debug_assert!(
            self.calling > 0 && self.calling_bytes >= size,
            "peer {}: a call released that was not charged",
            self.id
        );
        // Saturating in release builds too: a counter wrapped past zero
        // would hold the peer over its limits for good.
        self.calling = self.calling.saturating_sub(1);
        self.calling_bytes = self.calling_bytes.saturating_sub(size);
        self.user.release_call(size);
    }

    /// A request is delivered to this peer (as a service), until
    /// [`Peer::settle`].
    pub(crate) fn deliver(&mut self) {
        self.outstanding += 1;
    }

    /// A request delivered by [`Peer::deliver`] ended: answered
    /// (`replied`), or failed (timeout, cancel, error).
    pub(crate) fn settle(&mut self, replied: bool) {
        debug_assert!(
            self.outstanding > 0,
            "peer {}: a request settled that was not delivered",
            self.id
        );
        self.outstanding = self.outstanding.saturating_sub(1);
        if replied {
            self.served += 1;
        } else {
            self.failed += 1;
        }
    }
}

/// What [`Peers::hold_partial`] changed.
#[derive(Debug, Clone, Copy)]
pub struct PartialHold {
    /// The peer's hold before.
    pub before: usize,
    /// All peers' holds together, now.
    pub total: usize,
}

/// All live connections, and the totals of what they hold together.
#[derive(Debug, Default)]
pub struct Peers {
    map: FxHashMap<PeerId, Peer>,
    next_id: PeerId,
    /// Read buffer bytes held for partly received frames, all connections
    /// together (the sum of their `partial_bytes`).
    partial_total: usize,
    /// Names held, all connections together (the sum of their `names`).
    names_total: usize,
    /// The ids of `map`, in order (for paging through `zrpcd.peers`).
    order: BTreeSet<PeerId>,
}

impl Peers {
    /// Adds a connection of `user` (counted in its account until
    /// [`Peers::remove`]) and returns its id.
    pub fn insert(
        &mut self,
        io: Rc<PeerIo>,
        creds: Creds,
        groups: Box<[u32]>,
        user: Rc<Usage>,
    ) -> PeerId {
        self.next_id += 1;
        let id = self.next_id;
        self.order.insert(id);
        self.map.insert(
            id,
            Peer {
                id,
                io,
                ready: false,
                instance: 0,
                agent: String::new(),
                creds,
                groups,
                user,
                since: Instant::now(),
                names: Vec::new(),
                outstanding: 0,
                calling: 0,
                calling_bytes: 0,
                served: 0,
                failed: 0,
                calls_made: 0,
                last_seen: Instant::now(),
                limit_logged: false,
                partial_since: None,
                partial_bytes: 0,
                fds: Rc::default(),
            },
        );
        id
    }

    /// Looks up a connection.
    pub fn get(&self, id: PeerId) -> Option<&Peer> {
        self.map.get(&id)
    }

    /// Looks up a connection mutably.
    pub fn get_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        self.map.get_mut(&id)
    }

    /// Removes a connection, releasing all it holds in its user's account
    /// (its pending calls, its partial frame, its names, the connection
    /// itself) and in the partial-frame and names totals. The peer returned keeps its counters, to
    /// say what there is to clean up.
    pub fn remove(&mut self, id: PeerId) -> Option<Peer> {
        let p = self.map.remove(&id)?;
        self.order.remove(&id);
        self.partial_total = self.partial_total.saturating_sub(p.partial_bytes);
        self.names_total = self.names_total.saturating_sub(p.names.len());
        p.user.release_peer(
            p.calling as usize,
            p.calling_bytes,
            p.partial_bytes,
            p.names.len(),
        );
        Some(p)
    }

    /// Records that `id` now holds `name`, counted in its user's account
    /// and in [`Peers::names_total`] until [`Peers::remove_name`] or the
    /// peer's removal ([`Peers::remove`]). Nothing if the peer is gone.
    pub(crate) fn add_name(&mut self, id: PeerId, name: &str) {
        let Some(p) = self.map.get_mut(&id) else {
            return;
        };
        p.names.push(name.into());
        p.user.hold_name(true);
        self.names_total += 1;
    }

    /// Records that `id` no longer holds `name` (nothing if it did not).
    pub(crate) fn remove_name(&mut self, id: PeerId, name: &str) {
        let Some(p) = self.map.get_mut(&id) else {
            return;
        };
        let Some(pos) = p.names.iter().position(|n| &**n == name) else {
            return;
        };
        p.names.remove(pos);
        p.user.hold_name(false);
        self.names_total = self.names_total.saturating_sub(1);
    }

    /// Names held, all connections together.
    pub fn names_total(&self) -> usize {
        self.names_total
    }

    /// The connections with an id above `after` (all with `None`), by id.
    pub fn after(&self, after: Option<PeerId>) -> impl Iterator<Item = &Peer> {
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        self.order
            .range((from, Bound::Unbounded))
            .filter_map(|id| self.map.get(id))
    }

    /// Records that `held` bytes of `id`'s read buffer now hold a partly
    /// received frame (0: none); `new_frame`: frames completed since the
    /// last report, so a partial frame is a new one and its clock starts
    /// at `now`. None if the peer is gone.
    pub fn hold_partial(
        &mut self,
        id: PeerId,
        held: usize,
        new_frame: bool,
        now: Instant,
    ) -> Option<PartialHold> {
        let p = self.map.get_mut(&id)?;
        let before = std::mem::replace(&mut p.partial_bytes, held);
        p.user.hold_partial(before, held);
        p.partial_since = match (held, p.partial_since) {
            (0, _) => None,
            (_, Some(since)) if !new_frame => Some(since),
            _ => Some(now),
        };
        self.partial_total = self.partial_total.saturating_sub(before) + held;
        Some(PartialHold {
            before,
            total: self.partial_total,
        })
    }

    /// Read buffer bytes held for partly received frames, all connections
    /// together.
    pub fn partial_total(&self) -> usize {
        self.partial_total
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if there are no connections.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Iterates over all connections.
    pub fn iter(&self) -> impl Iterator<Item = &Peer> {
        self.map.values()
    }
}
