//! Bounds on partly received frames: how long one may take to complete
//! (`--frame-timeout`) and how much read buffer all of them together may
//! hold (`--max-partial-bytes`). A peer that sends 15 MiB of a 16 MiB frame
//! and stops must not hold that memory forever, nor may many such peers
//! together exhaust the broker.

use std::time::{Duration, Instant};

use zrpc_proto::ErrorCode;

use super::{Broker, Fatal};
use crate::peers::PeerId;

impl Broker {
    /// Records, after a read batch of `peer`, that `held` bytes of read
    /// buffer now hold a partly received frame (0: none). `new_frame` says
    /// that frames completed in this batch, so a partial frame left is a new
    /// one and its clock starts now. Fails if the broker-wide total would
    /// pass `--max-partial-bytes` because this peer's hold grew.
    pub fn note_partial(
        &mut self,
        peer: PeerId,
        held: usize,
        new_frame: bool,
        now: Instant,
    ) -> Result<(), Fatal> {
        let Some(hold) = self.peers.hold_partial(peer, held, new_frame, now) else {
            return Ok(());
        };
        if held <= hold.before {
            return Ok(());
        }
        let max = self.config.max_partial_bytes;
        if hold.total > max {
            let total = hold.total;
            return Err(Fatal {
                code: ErrorCode::LimitExceeded,
                message: format!(
                    "zrpcd holds {total} bytes of partly received frames, more than the limit of {max} (--max-partial-bytes)"
                ),
            });
        }
        let quota = self.quota.partial_bytes;
        let user = self.peers.get(peer).map(|p| p.user());
        if let Some(user) = user.filter(|u| u.limited() && u.partial_bytes() > quota) {
            return Err(Fatal {
                code: ErrorCode::LimitExceeded,
                message: format!(
                    "uid {} holds {} bytes of partly received frames, more than its per-user quota of {quota} (partial_bytes in [quota] of the policy)",
                    user.uid(),
                    user.partial_bytes()
                ),
            });
        }
        Ok(())
    }

    /// Closes, with `Fatal{Timeout}`, every connection whose partial frame
    /// began longer than `--frame-timeout` ago.
    pub fn expire_partial_frames(&mut self, now: Instant) {
        if self.peers.partial_total() == 0 {
            return;
        }
        let limit = self.config.frame_timeout;
        let stalled: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|p| {
                !p.io().closed.get()
                    && p.partial_since()
                        .is_some_and(|since| now.saturating_duration_since(since) > limit)
            })
            .map(|p| p.id())
            .collect();
        for id in stalled {
            let fatal = Fatal {
                code: ErrorCode::Timeout,
                message: format!(
                    "a frame was not completed within {limit:?} of its first bytes (--frame-timeout)"
                ),
            };
            self.fatal(id, &fatal);
        }
    }
}

/// How often the broker looks for stalled partial frames: a quarter of the
/// frame timeout, between 10 ms and 1 s.
pub fn sweep_interval(frame_timeout: Duration) -> Duration {
    (frame_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}
