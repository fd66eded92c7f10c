//! Fresh memfds with their pages already allocated, made ahead of need by a
//! background thread.
//!
//! A sealed memfd is single-use, and allocating its shmem pages is most of
//! what filling one costs (on the project's 2-core VM about 350 of the
//! 440 us a fresh 1 MiB memfd takes; writing into pages that exist takes
//! about 70 us). So the payload writers take a memfd from here: one that
//! was created and `fallocate`d by the `zrpc-memfd` thread while the
//! process was waiting for something else, never shared with anyone, to be
//! written once, trimmed to the payload's length and sealed like any other
//! ([`crate::fdpass::SEALS`]). The receiver's guarantee is unchanged: it
//! gets a sealed memfd holding exactly the payload.
//!
//! The pool keeps at most two (`KEEP`) memfds of the size last asked for
//! (rounded up to 64 KiB, at most [`MAX_SIZE`]); a different size
//! replaces them, and memfds nobody took for [`IDLE`] are dropped (a
//! process that sent a large payload once does not hold their memory for
//! ever). A process that never sends a large payload never starts the
//! thread. A child forked from a process with a pool makes its memfds on
//! the spot: its copies of the ready memfds share their files (and file
//! offsets) with the parent's, it has no refill thread, and the pool's
//! lock may have been held by that thread at the fork.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::fdpass::new_memfd;

/// Memfds kept ready.
const KEEP: usize = 2;

/// Sizes are rounded up to this.
const GRAIN: usize = 64 * 1024;

/// Payloads larger than this get a memfd made on the spot.
pub const MAX_SIZE: usize = 16 * 1024 * 1024;

/// Ready memfds nobody took for this long are dropped.
pub const IDLE: Duration = Duration::from_secs(1);

struct Pool {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// The size class wanted (0: none yet).
    size: usize,
    /// Ready memfds of `size` bytes.
    ready: Vec<File>,
    /// When a memfd was last asked for.
    last_take: Option<Instant>,
}

/// The process that made the pool (0: none yet).
static POOL_PID: AtomicU32 = AtomicU32::new(0);

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        POOL_PID.store(std::process::id(), Ordering::Release);
        let ok = std::thread::Builder::new()
            .name("zrpc-memfd".into())
            .spawn(refill)
            .is_ok();
        if !ok {
            tracing::debug!("zrpc: cannot start the memfd prefill thread");
        }
        Pool {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        }
    })
}

fn lock(p: &Pool) -> std::sync::MutexGuard<'_, State> {
    p.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The background thread: keeps [`KEEP`] memfds of the wanted size ready.
fn refill() {
    let p = pool();
    loop {
        let size = {
            let mut st = lock(p);
            while st.size == 0 || st.ready.len() >= KEEP {
                if st.ready.is_empty() {
                    st = p.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                st = p
                    .wake
                    .wait_timeout(st, IDLE)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                if st.last_take.is_none_or(|t| t.elapsed() >= IDLE) {
                    // Not used lately: give the memory back.
                    st.ready.clear();
                    st.size = 0;
                }
            }
            st.size
        };
        let made = new_memfd().and_then(|f| {
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size as u64)?;
            Ok(f)
        });
        match made {
            Ok(f) => {
                let mut st = lock(p);
                if st.size == size {
                    st.ready.push(f);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "zrpc: cannot prefill a memfd");
                lock(p).size = 0;
            }
        }
    }
}

/// A fresh memfd for a payload of `len` bytes: a prefilled one holding
/// `cap >= len` allocated bytes (trim it to `len` before sealing), or,
/// if none is ready, a new empty one (`cap` 0).
pub fn take(len: usize) -> io::Result<(File, usize)> {
    let made_by = POOL_PID.load(Ordering::Acquire);
    if len > MAX_SIZE || (made_by != 0 && made_by != std::process::id()) {
        // Too large to keep ready, or a forked child of the pool's process
        // (see the module docs): never touches the pool.
        return Ok((new_memfd()?, 0));
    }
    let size = len.div_ceil(GRAIN).max(1) * GRAIN;
    let p = pool();
    let got = {
        let mut st = lock(p);
        st.last_take = Some(Instant::now());
        if st.size != size {
            st.size = size;
            st.ready.clear();
        }
        st.ready.pop()
    };
    p.wake.notify_one();
    match got {
        Some(f) => Ok((f, size)),
        None => Ok((new_memfd()?, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdpass::SealedFd;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    /// The two tests of the pool, one at a time: each asks for its own
    /// size, which drops the memfds made for the other's, and the first
    /// then waits for the pool to go idle while the second keeps asking.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    #[test]
    fn a_prefilled_memfd_is_trimmed_to_its_payload_and_sealed() {
        let _alone = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let len = 100_000 + 17;
        // The first one asked for may be new (none ready yet); the thread
        // makes them ahead of need.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut f, cap) = loop {
            let (f, cap) = take(len).expect("take");
            if cap > 0 || Instant::now() > deadline {
                break (f, cap);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(cap, 2 * GRAIN, "rounded up to the grain");
        assert_eq!(f.metadata().expect("stat").len(), cap as u64, "allocated");
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        f.write_all(&data).expect("write");
        let s = SealedFd::seal(f, len, cap).expect("seal");
        let dup = s.as_fd().try_clone_to_owned().expect("dup");
        let v = SealedFd::verify(dup, 1 << 20).expect("a sealed memfd");
        assert_eq!(v.len(), len, "trimmed to the payload");
        assert_eq!(&v.map().expect("map")[..], &data[..]);
        // Larger than the pool serves: made on the spot.
        assert_eq!(take(MAX_SIZE + 1).expect("take").1, 0);
        // Nobody asks for a while: the ready memfds are dropped.
        let deadline = Instant::now() + IDLE * 10;
        loop {
            let (size, ready) = {
                let st = lock(pool());
                (st.size, st.ready.len())
            };
            if size == 0 && ready == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "ready memfds kept while idle");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A child forked while memfds are ready must not take one of them (it
    /// shares the file and its offset with the parent's copy: the parent's
    /// sealed payload could hold the child's bytes), nor touch the pool's
    /// lock (held here across the fork, as the refill thread may hold it).
    #[test]
    fn a_forked_child_makes_its_memfds_on_the_spot() {
        let _alone = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let len: usize = 1024 * 1024 - 1000;
        let size = len.div_ceil(GRAIN) * GRAIN;
        // Other tests of this process change the size wanted: ask for this
        // size, then wait (without taking one: a take pops a ready memfd)
        // for two ready memfds of it, and fork holding the lock. Asked
        // again after a while below `IDLE`, past which they are dropped.
        let deadline = Instant::now() + Duration::from_secs(10);
        let held = 'filled: loop {
            let _ = take(len).expect("take");
            let asked = Instant::now();
            while asked.elapsed() < IDLE / 2 {
                let st = lock(pool());
                if st.size == size && st.ready.len() == KEEP {
                    break 'filled st;
                }
                drop(st);
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(Instant::now() < deadline, "the pool never filled");
        };
        let mut pipe = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes syscalls (alarm, memfd_create,
        // write) and leaves with _exit, allocating nothing.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: as above; a child blocked on the pool's lock dies of
            // SIGALRM, and the parent reads no byte.
            unsafe {
                libc::alarm(5);
                let fresh = take(len).is_ok_and(|(_, cap)| cap == 0);
                libc::write(pipe[1], [u8::from(fresh)].as_ptr().cast(), 1);
                libc::_exit(0);
            }
        }
        drop(held);
        let mut b = [9u8; 1];
        // SAFETY: closes our write end, reads one byte into `b`, waits for
        // the child by its pid.
        let n = unsafe {
            libc::close(pipe[1]);
            let n = libc::read(pipe[0], b.as_mut_ptr().cast(), 1);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            libc::close(pipe[0]);
            n
        };
        assert_eq!(n, 1, "the forked child blocked on the pool's lock");
        assert_eq!(b[0], 1, "the forked child took a prefilled memfd");
    }
}
