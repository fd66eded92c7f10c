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
    /// Socket activation passed something zrpcd cannot serve.
    #[error("systemd socket activation: {reason}")]
    Activation {
        /// What is wrong and what to change.
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
    // SAFETY: geteuid has no preconditions.
    check_links(dir, unsafe { libc::geteuid() })?;
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
    check_parents(dir, me)
}

/// The directories above the socket directory: each owned by us or root,
/// and not writable by other users unless sticky (as `/tmp`); and every
/// symbolic link on the path as given owned by us or root. Otherwise
/// another user could rename the checked directory away (or repoint a link
/// of theirs on the way to it) and put one of theirs in its place between
/// the check and the broker's later use of the path (its lock, socket and
/// `zrpcd.names`; red-team pass 6 did, and had a poisoned names file read).
/// Both the path as given and the path it resolves to are checked, each
/// directory once (the links on the way: [`check_links`], which
/// [`prepare_dir`] ran before making the directory).
fn check_parents(dir: &Path, me: u32) -> Result<(), SetupError> {
    let refuse = |place: &Path, why: String| {
        SetupError::UnsafeDir {
        path: dir.into(),
        reason: format!(
            "the directory above it, {}, is {why}: another user could swap the socket directory for one of theirs; use a directory whose parents only root or the broker's user may change",
            place.display()
        ),
    }
    };
    let unsafe_owner = |meta: &fs::Metadata| meta.uid() != me && meta.uid() != 0;
    let given = absolute(dir)?;
    let full = fs::canonicalize(dir).map_err(io_err("cannot resolve socket directory", dir))?;
    let given_dirs = given
        .ancestors()
        .skip(1)
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()));
    // The same directories twice unless a link is on the way: once each.
    let places: std::collections::BTreeSet<&Path> =
        full.ancestors().skip(1).chain(given_dirs).collect();
    for place in places {
        let meta =
            fs::metadata(place).map_err(io_err("cannot inspect the directory above", place))?;
        let mode = meta.mode() & 0o7777;
        if unsafe_owner(&meta) {
            return Err(refuse(place, format!("owned by uid {}", meta.uid())));
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(refuse(
                place,
                format!("mode {mode:04o}, writable by other users and not sticky"),
            ));
        }
    }
    Ok(())
}

/// `dir` made absolute (against the working directory), not resolved.
fn absolute(dir: &Path) -> Result<PathBuf, SetupError> {
    if dir.is_absolute() {
        return Ok(dir.to_path_buf());
    }
    Ok(std::env::current_dir()
        .map_err(io_err("cannot resolve socket directory", dir))?
        .join(dir))
}

/// Every symbolic link on the way to `dir` (the parts that exist) is owned
/// by us or root: another user's could be repointed at a directory of
/// theirs at any time. Checked before the directory is made, too.
fn check_links(dir: &Path, me: u32) -> Result<(), SetupError> {
    for place in absolute(dir)?.ancestors().skip(1) {
        let meta = match fs::symlink_metadata(place) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            other => other.map_err(io_err("cannot inspect the directory above", place))?,
        };
        if meta.file_type().is_symlink() && meta.uid() != me && meta.uid() != 0 {
            return Err(SetupError::UnsafeDir {
                path: dir.into(),
                reason: format!(
                    "the directory above it, {}, is a symbolic link owned by uid {}: another user could point it at a directory of theirs; use a path without other users' links",
                    place.display(),
                    meta.uid()
                ),
            });
        }
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
    // (Without waiting: a live listener whose backlog is full counts too.)
    if zrpc_io::handshake::is_listening(&path) {
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

/// The name `zrpcd.socket` gives its socket (`FileDescriptorName=`; systemd's
/// default is the socket unit's name). When several sockets are passed, the
/// broker takes the one with this name.
pub const LISTEN_FD_NAME: &str = "zrpcd.socket";

/// Adopts a listening socket passed by systemd socket activation
/// (`sd_listen_fds_with_names(3)`, read by the `sd-notify` crate:
/// `LISTEN_PID` must be our pid, `LISTEN_FDS` >= 1, names from
/// `LISTEN_FDNAMES`). With one socket passed it is taken whatever its name;
/// with several, the one named [`LISTEN_FD_NAME`]. The `listenfd` crate then
/// takes it as a `UnixListener` only if it is an `AF_UNIX` stream socket.
///
/// Returns `Ok(None)` when not socket-activated (no `LISTEN_FDS`, or a
/// `LISTEN_PID` that is another process's: the variables were inherited, not
/// meant for us). The lock in `dir` is still taken, so a hand-started broker
/// on the same directory is refused.
pub fn adopt_listen_fds(dir: &Path) -> Result<Option<BoundSocket>, SetupError> {
    let passed: Vec<(i32, String)> = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds.collect(),
        Err(e) => {
            return Err(SetupError::Activation {
                reason: format!("{e} (LISTEN_PID, LISTEN_FDS or LISTEN_FDNAMES is malformed)"),
            })
        }
    };
    if passed.is_empty() {
        if std::env::var_os("LISTEN_FDS").is_some() {
            tracing::info!(
                listen_pid = ?std::env::var_os("LISTEN_PID"),
                "LISTEN_FDS is set for another process (LISTEN_PID is not ours): binding our own socket"
            );
        }
        return Ok(None);
    }
    // listenfd reads the same variables (and has already seen LISTEN_PID
    // is ours, since sd-notify returned fds).
    let mut listenfds = listenfd::ListenFd::from_env();
    // Not inherited by anything we might start. Called from main before
    // any other thread exists.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let index = if passed.len() == 1 {
        0
    } else {
        passed
            .iter()
            .position(|(_, name)| name == LISTEN_FD_NAME)
            .ok_or_else(|| SetupError::Activation {
                reason: format!(
                    "{} sockets were passed ({}) and none is named {LISTEN_FD_NAME}; \
                     pass one socket, or set FileDescriptorName={LISTEN_FD_NAME} on the one zrpcd should serve",
                    passed.len(),
                    passed
                        .iter()
                        .map(|(fd, name)| format!("fd {fd} {name:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?
    };
    let (fd, name) = &passed[index];
    // listenfd checks it is an AF_UNIX SOCK_STREAM socket, and leaves the
    // fd alone if not.
    let listener = listenfds
        .take_unix_listener(index)
        .and_then(|l| l.ok_or_else(|| std::io::Error::other("listenfd does not see it")))
        .map_err(|e| SetupError::Activation {
            reason: format!(
            "the socket passed as fd {fd} ({name:?}) is refused: {e}; zrpcd serves only an AF_UNIX \
             stream socket (ListenStream=/run/zrpc/zrpcd.sock in zrpcd.socket)"
        ),
        })?;
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
