//! A minimal FUSE file system, served in-process with the raw kernel
//! protocol (`/dev/fuse`, see linux/fuse.h), whose one file blocks the
//! close(2) of one chosen process: the FUSE `FLUSH` a close sends is never
//! answered for that process (a hostile user's daemon), so its close waits
//! until the connection is aborted. Everyone else's closes are answered.
//! Needs root (mount(2)) and `/dev/fuse`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::TempDir;

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_BATCH_FORGET: u32 = 42;
/// `sizeof(struct fuse_in_header)`.
const IN_HEADER: usize = 40;
/// The node id of the one file (the root is 1).
const FILE_NODE: u64 = 2;
/// The one file's name in the root directory.
pub const FILE_NAME: &str = "stuck";

/// A mounted FUSE file system with one file, [`FILE_NAME`], whose closes
/// by the process [`StuckFs::block_flushes_of`] names never return while
/// the file system is mounted. Unmounted on drop: the connection is
/// aborted first (the server closes `/dev/fuse`), which ends every
/// blocked close.
pub struct StuckFs {
    dir: TempDir,
    mnt: PathBuf,
    stop: Arc<AtomicBool>,
    blocked_pid: Arc<AtomicU32>,
    unanswered: Arc<AtomicUsize>,
    server: Option<JoinHandle<()>>,
}

/// Why a [`StuckFs`] could not be mounted (the caller skips its test).
#[derive(Debug)]
pub struct Unavailable(pub String);

impl StuckFs {
    /// Mounts the file system on a fresh directory, readable by every uid
    /// (`allow_other`), and starts serving it.
    pub fn mount() -> Result<StuckFs, Unavailable> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| Unavailable(format!("cannot open /dev/fuse: {e}")))?;
        let dir = TempDir::new();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        let target = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()).expect("path");
        let opts = std::ffi::CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
            dev.as_raw_fd()
        ))
        .expect("options");
        // SAFETY: mount(2) with NUL-terminated strings that outlive the
        // call; the data string is the fuse file system's option string.
        let r = unsafe {
            libc::mount(
                c"zrpctest".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(Unavailable(format!(
                "cannot mount a fuse file system: {}",
                std::io::Error::last_os_error()
            )));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let blocked_pid = Arc::new(AtomicU32::new(0));
        let unanswered = Arc::new(AtomicUsize::new(0));
        let server = {
            let (stop, blocked_pid, unanswered) =
                (stop.clone(), blocked_pid.clone(), unanswered.clone());
            std::thread::spawn(move || serve(dev, &stop, &blocked_pid, &unanswered))
        };
        Ok(StuckFs {
            dir,
            mnt,
            stop,
            blocked_pid,
            unanswered,
            server: Some(server),
        })
    }

    /// The one file's path.
    pub fn file(&self) -> PathBuf {
        self.mnt.join(FILE_NAME)
    }

    /// From now on, closes of the file by any thread of process `pid`
    /// block (their `FLUSH` requests are never answered).
    pub fn block_flushes_of(&self, pid: u32) {
        self.blocked_pid.store(pid, Ordering::SeqCst);
    }

    /// `FLUSH` requests left unanswered so far: closes blocked now.
    pub fn blocked_closes(&self) -> usize {
        self.unanswered.load(Ordering::SeqCst)
    }

    /// The temporary directory holding the mount point.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for StuckFs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
        let target = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes());
        if let Ok(target) = target {
            // SAFETY: umount2(2) with a NUL-terminated path.
            unsafe {
                libc::umount2(target.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// Answers requests on `dev` until `stop`, then closes it: the kernel
/// aborts the connection, and every request still waiting fails.
fn serve(mut dev: File, stop: &AtomicBool, blocked_pid: &AtomicU32, unanswered: &AtomicUsize) {
    // At least FUSE_MIN_READ_BUFFER (8 KiB) and room for max_write.
    let mut buf = vec![0u8; 1 << 17];
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd that lives across the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 20) };
        if ready <= 0 {
            continue;
        }
        let n = match dev.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // interrupted
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if n < IN_HEADER {
            continue;
        }
        let req = &buf[..n];
        let u32_at = |o: usize| u32::from_ne_bytes(req[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_ne_bytes(req[o..o + 8].try_into().expect("8 bytes"));
        let (opcode, unique, node, pid) = (u32_at(4), u64_at(8), u64_at(16), u32_at(32));
        let body = &req[IN_HEADER..];
        let answer: Result<Vec<u8>, i32> = match opcode {
            FUSE_INIT => Ok(init_out(u32::from_ne_bytes(
                body[4..8].try_into().expect("minor"),
            ))),
            FUSE_LOOKUP
                if node == 1 && body.split(|&b| b == 0).next() == Some(FILE_NAME.as_bytes()) =>
            {
                Ok(entry_out(FILE_NODE))
            }
            FUSE_LOOKUP => Err(libc::ENOENT),
            FUSE_GETATTR => Ok(attr_out(node)),
            FUSE_OPEN => Ok(vec![0u8; 16]), // fh 0, no FOPEN_NOFLUSH
            FUSE_RELEASE => Ok(Vec::new()),
            FUSE_FLUSH if is_thread_of(pid, blocked_pid.load(Ordering::SeqCst)) => {
                unanswered.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            FUSE_FLUSH => Ok(Vec::new()),
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => continue,
            _ => Err(libc::ENOSYS),
        };
        let (error, out) = match answer {
            Ok(out) => (0i32, out),
            Err(errno) => (-errno, Vec::new()),
        };
        let mut reply = Vec::with_capacity(16 + out.len());
        reply.extend_from_slice(&((16 + out.len()) as u32).to_ne_bytes());
        reply.extend_from_slice(&error.to_ne_bytes());
        reply.extend_from_slice(&unique.to_ne_bytes());
        reply.extend_from_slice(&out);
        // A request the kernel gave up on (interrupted) is not an error.
        let _ = dev.write(&reply);
    }
    // Dropping `dev` (the last descriptor of the connection) aborts it.
    drop(dev);
}

/// Whether thread `tid` (a request's `pid`: the calling thread's id) is
/// one of process `pid`'s.
fn is_thread_of(tid: u32, pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
}

/// `struct fuse_init_out` for protocol 7.`minor` (at most 7.31).
fn init_out(kernel_minor: u32) -> Vec<u8> {
    let mut o = Vec::with_capacity(64);
    o.extend_from_slice(&7u32.to_ne_bytes()); // major
    o.extend_from_slice(&kernel_minor.min(31).to_ne_bytes()); // minor
    o.extend_from_slice(&0u32.to_ne_bytes()); // max_readahead
    o.extend_from_slice(&0u32.to_ne_bytes()); // flags
    o.extend_from_slice(&0u16.to_ne_bytes()); // max_background
    o.extend_from_slice(&0u16.to_ne_bytes()); // congestion_threshold
    o.extend_from_slice(&4096u32.to_ne_bytes()); // max_write
    o.extend_from_slice(&1u32.to_ne_bytes()); // time_gran
    o.resize(64, 0); // max_pages, map_alignment, flags2, unused
    o
}

/// `struct fuse_attr` of node `node`: the root directory or the file.
fn attr(node: u64) -> Vec<u8> {
    let mode = if node == 1 {
        libc::S_IFDIR | 0o755
    } else {
        libc::S_IFREG | 0o666
    };
    let mut a = Vec::with_capacity(88);
    a.extend_from_slice(&node.to_ne_bytes()); // ino
    a.extend_from_slice(&[0u8; 8 * 5]); // size, blocks, atime, mtime, ctime
    a.extend_from_slice(&[0u8; 4 * 3]); // nsecs
    a.extend_from_slice(&mode.to_ne_bytes());
    a.extend_from_slice(&1u32.to_ne_bytes()); // nlink
    a.extend_from_slice(&[0u8; 4 * 3]); // uid, gid, rdev
    a.extend_from_slice(&4096u32.to_ne_bytes()); // blksize
    a.extend_from_slice(&0u32.to_ne_bytes()); // flags
    a
}

/// `struct fuse_attr_out`: attributes valid for 0 s.
fn attr_out(node: u64) -> Vec<u8> {
    let mut o = vec![0u8; 16];
    o.extend_from_slice(&attr(node));
    o
}

/// `struct fuse_entry_out` for `node`.
fn entry_out(node: u64) -> Vec<u8> {
    let mut o = Vec::with_capacity(128);
    o.extend_from_slice(&node.to_ne_bytes()); // nodeid
    o.extend_from_slice(&[0u8; 8 * 3 + 4 * 2]); // generation, valid times
    o.extend_from_slice(&attr(node));
    o
}
