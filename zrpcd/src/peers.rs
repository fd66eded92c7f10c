//! The peers table: one entry per live connection.

use std::rc::Rc;
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::queue::PeerIo;

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

impl Peer {
    /// Who the peer is, for the access policy.
    pub fn identity(&self) -> crate::policy::Identity<'_> {
        crate::policy::Identity {
            uid: self.creds.uid,
            gid: self.creds.gid,
            groups: &self.groups,
        }
    }
}

/// One connection.
#[derive(Debug)]
pub struct Peer {
    /// Connection id.
    pub id: PeerId,
    /// Shared with the writer task.
    pub io: Rc<PeerIo>,
    /// `Hello` received.
    pub ready: bool,
    /// Instance id from `Hello`.
    pub instance: u64,
    /// Agent string from `Hello`.
    pub agent: String,
    /// From `SO_PEERCRED`, never from what the peer claims.
    pub creds: Creds,
    /// Supplementary groups from `SO_PEERGROUPS` (empty if the kernel gave
    /// none).
    pub groups: Box<[u32]>,
    /// What this peer's uid holds, all its connections together.
    pub user: Rc<crate::quota::Usage>,
    /// When the connection was accepted.
    pub since: Instant,
    /// Names held.
    pub names: Vec<Box<str>>,
    /// Calls delivered to this peer (as a service) not yet answered.
    pub outstanding: u32,
    /// Calls made by this peer (as a client) not yet answered.
    pub calling: u32,
    /// Payload bytes of those calls, kept by the broker.
    pub calling_bytes: usize,
    /// Requests this peer answered (as a service).
    pub served: u64,
    /// Requests delivered to this peer that ended in an error or timeout.
    pub failed: u64,
    /// Calls this peer made.
    pub calls_made: u64,
    /// When a frame last arrived from this peer.
    pub last_seen: Instant,
    /// A limit hit by this peer was already logged at warn level.
    pub limit_logged: bool,
    /// When the frame this peer is in the middle of sending began to
    /// arrive (None: no partial frame).
    pub partial_since: Option<Instant>,
    /// Read buffer bytes held for that partial frame.
    pub partial_bytes: usize,
}

/// All live connections.
#[derive(Debug, Default)]
pub struct Peers {
    map: FxHashMap<PeerId, Peer>,
    next_id: PeerId,
}

impl Peers {
    /// Adds a connection and returns its id.
    pub fn insert(
        &mut self,
        io: Rc<PeerIo>,
        creds: Creds,
        user: Rc<crate::quota::Usage>,
    ) -> PeerId {
        self.next_id += 1;
        let id = self.next_id;
        self.map.insert(
            id,
            Peer {
                id,
                io,
                ready: false,
                instance: 0,
                agent: String::new(),
                creds,
                groups: Box::default(),
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

    /// Removes a connection.
    pub fn remove(&mut self, id: PeerId) -> Option<Peer> {
        self.map.remove(&id)
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
