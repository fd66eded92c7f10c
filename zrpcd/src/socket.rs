//! Creating the socket directory, taking the broker lock, binding the socket.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why the broker could not take its socket.
#[derive(Debug, Error)]
pub enum SetupError {
    /// Another broker holds the lock on this socket directory.
    #[error("another zrpcd (pid {pid}) is already running on {path}; stop it first or use another --socket-dir")]
    AlreadyRunning {
        /// Socket path.
        path: PathBuf,
        /// Pid recorded by the running broker, or "unknown".
        pid: String,
    },
    /// The socket directory is unsafe to use.
    #[error("refusing socket directory {path}: {reason}")]
    UnsafeDir {
        /// Directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An I/O step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SetupError + 'a {
    move |source| SetupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The bound listening socket, and the lock that proves it is ours.
#[derive(Debug)]
pub struct BoundSocket {
    /// The listener (non-blocking is set by the caller).
    pub listener: UnixListener,
    /// Path of the socket file.
    pub path: PathBuf,
    /// Whether the socket file is ours to remove on shutdown (not when it
    /// was passed in by systemd socket activation).
    pub remove_on_exit: bool,
    _lock: File,
}

/// Creates `dir` if missing (mode 0755) and checks it is safe: a real
/// directory (not a symlink) owned by us or by root.
pub fn prepare_dir(dir: &Path) -> Result<(), SetupError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io_err("cannot create socket directory", dir))?;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
        }
        Err(e) => return Err(io_err("cannot inspect socket directory", dir)(e)),
        Ok(_) => {}
    }
    let meta = fs::symlink_metadata(dir).map_err(io_err("cannot inspect socket directory", dir))?;
    if meta.file_type().is_symlink() {
        return Err(SetupError::UnsafeDir {
            path: dir.into(),
            reason: "it is a symbolic link".into(),
        });
    }
    if !meta.is_dir() {
        return Err(SetupError::UnsafeDir {
            path: dir.into(),
            reason: "it is not a directory".into(),
        });
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(SetupError::UnsafeDir {
            path: dir.into(),
            reason: format!(
                "it is owned by uid {}, not by us (uid {me}) or root: another user may have created it to catch our clients",
                meta.uid()
            ),
        });
    }
    // Other users must not be able to put files (a socket of their own)
    // into it either.
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(SetupError::UnsafeDir {
            path: dir.into(),
            reason: format!(
                "its mode {mode:04o} lets other users write into it; make it 0755 (or 0750) and owned by the broker's user"
            ),
        });
    }
    Ok(())
}

/// Takes the broker lock in `dir`. Fails with [`SetupError::AlreadyRunning`]
/// if another broker holds it.
fn lock(dir: &Path) -> Result<File, SetupError> {
    prepare_dir(dir)?;
    let lock_path = dir.join(zrpc_proto::LOCK_FILE);
    let path = zrpc_proto::socket_path(dir);
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(io_err("cannot open lock file", &lock_path))?;
    // SAFETY: flock on an fd we own.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = lock.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(SetupError::AlreadyRunning {
                path,
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid.into()
                },
            });
        }
        return Err(io_err("cannot lock", &lock_path)(err));
    }
    let _ = lock.set_len(0);
    let _ = writeln!(lock, "{}", std::process::id());
    Ok(lock)
}

/// Takes the broker lock in `dir`, replaces a stale socket file, binds.
pub fn bind(dir: &Path, mode: u32) -> Result<BoundSocket, SetupError> {
    let lock = lock(dir)?;
    let path = zrpc_proto::socket_path(dir);
    // We hold the lock, so a socket file here was left by a dead broker,
    // unless something else (systemd's zrpcd.socket, say) listens on it:
    // never take over a live socket.
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(SetupError::AlreadyRunning {
            path,
            pid: "unknown: the socket accepts connections but the lock is free (systemd socket activation?)".into(),
        });
    }
    match fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "replaced stale socket file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot remove stale socket", &path)(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io_err("cannot bind", &path))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set permissions on", &path))?;
    Ok(BoundSocket {
        listener,
        path,
        remove_on_exit: true,
        _lock: lock,
    })
}

/// Adopts a listening socket passed by systemd socket activation
/// (`sd_listen_fds(3)`: `LISTEN_PID` is our pid and `LISTEN_FDS` >= 1; the
/// socket is fd 3). Returns `Ok(None)` when not socket-activated. The lock in
/// `dir` is still taken, so a hand-started broker on the same directory is
/// refused.
pub fn adopt_listen_fds(dir: &Path) -> Result<Option<BoundSocket>, SetupError> {
    const SD_LISTEN_FDS_START: i32 = 3;
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let nfds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    if !pid_ok || nfds < 1 {
        return Ok(None);
    }
    // Not inherited by anything we might start.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let fd = SD_LISTEN_FDS_START;
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt/fcntl on the fd systemd passed us, with valid
    // pointers to locals.
    let ok = unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    } == 0
        && ty == libc::SOCK_STREAM;
    if !ok {
        return Err(SetupError::UnsafeDir {
            path: dir.into(),
            reason: "the socket passed by systemd (fd 3) is not a stream socket".into(),
        });
    }
    // SAFETY: systemd hands us ownership of fd 3, a listening socket.
    let listener = unsafe { <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_else(|| zrpc_proto::socket_path(dir));
    let lock = lock(dir)?;
    Ok(Some(BoundSocket {
        listener,
        path,
        remove_on_exit: false,
        _lock: lock,
    }))
}
