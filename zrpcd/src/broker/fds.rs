//! Frames whose payload arrives in a descriptor (a sealed memfd, see
//! [`zrpc_io::fdpass`]): verified before anything else, counted against
//! the sender's connection, its user and the broker-wide limit, then
//! routed like any frame, the descriptor forwarded without the broker
//! touching the bytes.

use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::Instant;

use zrpc_io::fdpass::{SealedFd, MAX_FDS_PER_MSG};
use zrpc_proto::{Envelope, ErrorCode};

use super::{Broker, Fatal};
use crate::payload::{FdHold, FdPayload, Payload};
use crate::peers::PeerId;

impl Broker {
    /// Whether `peer` negotiated payloads in descriptors (its frames may
    /// then carry them, see [`zrpc_proto::FD_PAYLOAD_FLAG`]).
    pub fn takes_fds(&self, peer: PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.io().fds.get())
    }

    /// Counts the `n` descriptors `peer` sent ahead of the frames they
    /// belong to (received, not yet claimed by a frame) like descriptors
    /// the broker holds for it, in its connection's, its user's and the
    /// broker's counts, for as long as the returned holds live. Past
    /// `--max-fds-per-conn` unclaimed, or past its user's `fds` quota or
    /// `--max-fds` by more than one message's worth
    /// ([`MAX_FDS_PER_MSG`]: the descriptors of frames that arrive whole
    /// with the next read): `Fatal{LimitExceeded}`. A peer that sends
    /// descriptors without their frames must not hold the broker's
    /// descriptors outside every count.
    pub fn charge_unclaimed(&self, peer: PeerId, n: usize) -> Result<Vec<FdHold>, Fatal> {
        let Some(p) = self.peers.get(peer) else {
            return Ok(Vec::new());
        };
        let user = p.user_rc();
        let over = if n > self.config.max_fds_per_conn {
            Some(format!(
                "{n} descriptors sent ahead of their frames (limit --max-fds-per-conn)"
            ))
        } else {
            self.over_fd_limits(user, n, MAX_FDS_PER_MSG)
        };
        if let Some(message) = over {
            return Err(Fatal {
                code: ErrorCode::LimitExceeded,
                message,
            });
        }
        let hold = || FdHold::new(p.fds().clone(), user.clone(), self.fds_total.clone());
        Ok(std::iter::repeat_with(hold).take(n).collect())
    }

    /// Handles a frame of `peer` whose payload is the descriptor `fd`.
    ///
    /// A descriptor that is not a sealed memfd of an accepted size is a
    /// protocol error (`Fatal`): it is closed, never mapped. One past the
    /// limits (`--max-fds-per-conn`, `--max-fds`, the user's `fds` quota)
    /// is closed and refused with `LimitExceeded`: the `Result` of a
    /// `Call` (the connection stays), `Fatal` for any other frame.
    pub fn on_fd_frame(
        &mut self,
        peer: PeerId,
        envelope: &[u8],
        fd: OwnedFd,
        now: Instant,
    ) -> Result<(), Fatal> {
        let max = self.config.max_message_size as usize;
        let sealed = SealedFd::verify(fd, max).map_err(|e| {
            let code = match e {
                zrpc_io::fdpass::FdError::BadSize { .. } => ErrorCode::LimitExceeded,
                _ => ErrorCode::Protocol,
            };
            Fatal {
                code,
                message: e.to_string(),
            }
        })?;
        let Some(p) = self.peers.get(peer) else {
            return Ok(());
        };
        let (conn, user) = (p.fds().clone(), p.user_rc().clone());
        let over = if conn.get() >= self.config.max_fds_per_conn {
            Some(format!(
                "this connection already has {} payload descriptors held by zrpcd, the limit (--max-fds-per-conn)",
                conn.get()
            ))
        } else {
            self.over_fd_limits(&user, 1, 0)
        };
        if let Some(message) = over {
            drop(sealed);
            return match Envelope::decode(envelope) {
                Ok(Envelope::Call { id, .. }) if self.is_ready(peer) => {
                    self.refuse_call(peer, id, &message);
                    Ok(())
                }
                _ => Err(Fatal {
                    code: ErrorCode::LimitExceeded,
                    message,
                }),
            };
        }
        let hold = FdHold::new(conn, user, self.fds_total.clone());
        let payload = Rc::new(FdPayload::new(sealed, hold));
        self.on_frame_parts(peer, envelope, Payload::Fd(&payload), now)
    }

    /// Why `n` more descriptors held for `user` would pass `--max-fds` or
    /// its `fds` quota by more than `slack`, if they would. Counted with
    /// those held: the descriptors waiting for their close
    /// ([`crate::closer`]). Not those in flight towards peers: they are
    /// not open in the broker, and other users' unread ones must not get
    /// a sender refused (a `Reply` past the limit is `Fatal`); past
    /// `--max-fds` with them, payloads go inline instead
    /// ([`crate::queue::FdAccounts`]).
    fn over_fd_limits(&self, user: &crate::quota::Usage, n: usize, slack: usize) -> Option<String> {
        let (closing, closing_total) = crate::closer::waiting(user.uid());
        let held = self
            .fds_total
            .get()
            .saturating_sub(self.fd_accounts.in_flight.get());
        let total = held + closing_total;
        if total + n > self.config.max_fds + slack {
            Some(format!(
                "zrpcd already holds {total} descriptors ({closing_total} of them waiting for their close), the limit (--max-fds)"
            ))
        } else if user.limited() && user.fds() + closing + n > self.quota.fds + slack {
            Some(format!(
                "uid {} already has {} descriptors held by zrpcd ({closing} of them waiting for their close), its per-user quota (fds in [quota] of the policy)",
                user.uid(),
                user.fds() + closing
            ))
        } else {
            None
        }
    }

    /// Why `uid` may not connect, nor keep a connection that sent more
    /// descriptors, if descriptors it sent that are not payloads, waiting
    /// for a close that blocks ([`crate::closer`]), fill its `fds` quota,
    /// or all users' fill `--max-fds` and some of them are its own. A uid
    /// with none waiting is not refused (all users' filling `--max-fds`
    /// refuses only its descriptors, [`Broker::refuses_fds_from`]). Not for
    /// root, which is trusted.
    pub fn over_closing_limits(&self, uid: u32) -> Option<String> {
        if crate::closer::waiting(uid).0 == 0 {
            return None;
        }
        self.refuses_fds_from(uid)
    }

    /// Why descriptors `uid` sends are refused now (read with no room for
    /// them: never installed here), if they are: those it sent that wait
    /// for their close fill its `fds` quota, or all users' fill
    /// `--max-fds`. Not for root. A limit of 0 (no payload descriptors)
    /// counts as 1 here: nothing waiting never fills it.
    pub fn refuses_fds_from(&self, uid: u32) -> Option<String> {
        if uid == 0 {
            return None;
        }
        let (mine, all) = crate::closer::waiting(uid);
        if all >= self.config.max_fds.max(1) {
            Some(format!(
                "zrpcd has {all} descriptors sent to it that wait for their close (not memfds, a close that blocks), the limit (--max-fds)"
            ))
        } else if mine >= self.quota.fds.max(1) {
            Some(format!(
                "uid {uid} sent zrpcd {mine} descriptors that wait for their close (not memfds, a close that blocks), its per-user quota (fds in [quota] of the policy)"
            ))
        } else {
            None
        }
    }

    /// Answers call `id` of `peer` with `LimitExceeded` (`message`).
    fn refuse_call(&mut self, peer: PeerId, id: u64, message: &str) {
        self.log_refusal(peer, message);
        self.stats.error(ErrorCode::LimitExceeded);
        let env = Envelope::Result {
            id,
            code: Some(ErrorCode::LimitExceeded),
            message,
        };
        self.send(peer, &env, Payload::EMPTY);
    }

    /// Payload descriptors the broker holds in all (received and kept, or
    /// queued towards peers, or sent and not yet received by them).
    pub fn fds_held(&self) -> usize {
        self.fds_total.get()
    }

    /// Payload descriptors sent to peers and not yet received by them (as
    /// last seen), closed connections' included.
    pub fn fds_in_flight(&self) -> usize {
        self.fd_accounts.in_flight.get()
    }

    /// Closed connections kept open until their peer has received the
    /// descriptors sent to it.
    pub fn lingering(&self) -> usize {
        self.lingering.len()
    }

    /// Keeps `io`, a closed connection whose peer has not received every
    /// descriptor sent to it, until it has: the kernel charges them to
    /// the broker's uid until the peer reads them or closes its end,
    /// whether or not the broker's end is open. Kept open, its socket
    /// tells when that happens ([`Broker::release_received`]), and they
    /// stay counted against the peer's user meanwhile (its connection
    /// ended, but it cannot shed its count by reconnecting). At most one
    /// per descriptor in flight, which the limits bound.
    pub fn linger(&mut self, io: Rc<crate::queue::PeerIo>) {
        let mut q = io.queue.borrow_mut();
        q.clear_unsent();
        q.release_received(io.sock.get_ref());
        let left = q.fds_in_flight();
        drop(q);
        if left > 0 {
            tracing::debug!(
                descriptors = left,
                "a closed connection's peer has not received every descriptor sent to it; keeping the socket until it has"
            );
            self.lingering.push(io);
        }
    }

    /// Stops counting the descriptors that peers have received since last
    /// asked, live connections' and closed ones' (run periodically: a peer
    /// that reads while the broker writes it nothing more is seen here).
    /// Costs a system call per connection with descriptors in flight.
    pub fn release_received(&mut self) {
        for p in self.peers.iter() {
            let io = p.io();
            if io.queue.borrow().fds_in_flight() > 0 {
                io.queue.borrow_mut().release_received(io.sock.get_ref());
            }
        }
        self.lingering.retain(|io| {
            let mut q = io.queue.borrow_mut();
            q.release_received(io.sock.get_ref());
            q.fds_in_flight() > 0
        });
    }
}
