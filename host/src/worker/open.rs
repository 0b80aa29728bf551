//! Reading a queued file as safely as the walk reached it.
//!
//! The walk sees file types without following links, but a file can be
//! replaced between the walk and the read: by a symbolic link to a file
//! outside the index's roots, or by a FIFO that blocks whoever opens it.
//!
//! # Invariants
//! - A queued file is first opened as a bare handle (`O_PATH |
//!   O_NOFOLLOW`), which opens nothing: a final component that is a link
//!   is the link itself, and a FIFO or a device is not opened.
//! - The handle is judged by `fstat`, never the path again: only a
//!   regular file goes on.
//! - Where the handle really points (`/proc/self/fd/N`, which resolves
//!   every directory on the way) must be inside one of the index's roots;
//!   a directory swapped for a link to elsewhere is caught here too.
//! - Only then is the same file opened for reading, through the handle
//!   (`O_NONBLOCK`, so even a file that changed kind cannot block).
//! - A file is read through the descriptor, at most `limit + 1` bytes.
//!
//! Each refusal is a [`Skip`] with its reason, recorded like any other.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::extract::Skip;

/// Why a queued file was not read.
#[derive(Debug)]
pub enum NotRead {
    /// It is no longer there.
    Gone,
    /// It is there but is not a regular file inside the roots, is too
    /// large, or cannot be read.
    Skip(Skip),
}

/// A queued file, opened and read: its metadata (of what was opened) and
/// its bytes.
///
/// # Errors
/// [`NotRead::Gone`] if the path no longer exists, otherwise
/// [`NotRead::Skip`] with the reason.
pub fn read_queued(
    path: &Path,
    roots: &[PathBuf],
    limit: u64,
) -> Result<(Metadata, Vec<u8>), NotRead> {
    let mut file = open_regular(path, roots)?;
    let meta = file
        .metadata()
        .map_err(|e| NotRead::Skip(Skip::Unreadable(e.to_string())))?;
    if meta.len() > limit {
        return Err(NotRead::Skip(Skip::TooLarge {
            size: meta.len(),
            limit,
        }));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&mut file)
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| NotRead::Skip(Skip::Unreadable(e.to_string())))?;
    if bytes.len() as u64 > limit {
        // It grew while being read.
        return Err(NotRead::Skip(Skip::TooLarge {
            size: bytes.len() as u64,
            limit,
        }));
    }
    Ok((meta, bytes))
}

/// Opens `path` without following a link or blocking, and only if it is a
/// regular file inside `roots` (any, when no root is recorded: an index
/// made before roots were kept).
///
/// # Errors
/// As [`read_queued`].
pub fn open_regular(path: &Path, roots: &[PathBuf]) -> Result<File, NotRead> {
    // First a handle that opens nothing (`O_PATH`): the file's type and
    // real place are checked on it before the file itself is opened, so
    // nothing outside the roots, nor a FIFO or a device, is ever opened.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => NotRead::Gone,
            _ => NotRead::Skip(Skip::Unreadable(e.to_string())),
        })?;
    let kind = handle
        .metadata()
        .map_err(|e| NotRead::Skip(Skip::Unreadable(e.to_string())))?
        .file_type();
    if !kind.is_file() {
        return Err(NotRead::Skip(Skip::NotRegular(kind_name(&kind))));
    }
    if !roots.is_empty() {
        let real =
            real_path(&handle).map_err(|e| NotRead::Skip(Skip::Unreadable(e.to_string())))?;
        if !roots.iter().any(|root| real.starts_with(root)) {
            return Err(NotRead::Skip(Skip::OutsideRoots));
        }
    }
    // The same file, opened for reading through the handle (never by the
    // path again, which may have changed meanwhile).
    use std::os::fd::AsRawFd;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(|e| NotRead::Skip(Skip::Unreadable(e.to_string())))
}

/// Where an open descriptor points, every link on the way resolved.
fn real_path(file: &File) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

fn kind_name(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip(r: Result<(Metadata, Vec<u8>), NotRead>) -> Skip {
        match r {
            Err(NotRead::Skip(s)) => s,
            Err(NotRead::Gone) => panic!("gone"),
            Ok(_) => panic!("read"),
        }
    }

    #[test]
    fn links_fifos_and_files_outside_the_roots_are_skipped_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let root = root.canonicalize().unwrap();
        let secret = outside.join("secret.txt");
        std::fs::write(&secret, "secret").unwrap();
        let roots = vec![root.clone()];
        // A regular file inside: read.
        std::fs::write(root.join("a.txt"), "hello").unwrap();
        let (_, bytes) = read_queued(&root.join("a.txt"), &roots, 100).ok().unwrap();
        assert_eq!(bytes, b"hello");
        // A link to a file outside.
        std::os::unix::fs::symlink(&secret, root.join("link.txt")).unwrap();
        assert_eq!(
            skip(read_queued(&root.join("link.txt"), &roots, 100)),
            Skip::NotRegular("a symbolic link")
        );
        // A directory on the way swapped for a link to outside.
        std::os::unix::fs::symlink(&outside, root.join("dir")).unwrap();
        assert_eq!(
            skip(read_queued(&root.join("dir/secret.txt"), &roots, 100)),
            Skip::OutsideRoots
        );
        // A FIFO with no writer: refused at once, never waited on.
        let fifo = root.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(
            skip(read_queued(&fifo, &roots, 100)),
            Skip::NotRegular("a FIFO")
        );
        // Too large, and gone.
        assert!(matches!(
            skip(read_queued(&root.join("a.txt"), &roots, 2)),
            Skip::TooLarge { size: 5, limit: 2 }
        ));
        assert!(matches!(
            read_queued(&root.join("missing"), &roots, 100),
            Err(NotRead::Gone)
        ));
    }

    #[test]
    fn directories_sockets_devices_and_unopenable_names_are_skipped_naming_why() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let roots = vec![root.clone()];
        std::fs::create_dir(root.join("sub")).unwrap();
        assert_eq!(
            skip(read_queued(&root.join("sub"), &roots, 100)),
            Skip::NotRegular("a directory")
        );
        let _listener = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        assert_eq!(
            skip(read_queued(&root.join("sock"), &roots, 100)),
            Skip::NotRegular("a socket")
        );
        // No roots recorded (an older index): the type is still checked.
        assert_eq!(
            skip(read_queued(Path::new("/dev/null"), &[], 100)),
            Skip::NotRegular("a device")
        );
        // A name longer than the system allows: unreadable, not gone.
        let long = root.join("x".repeat(300));
        assert!(
            matches!(skip(read_queued(&long, &roots, 100)), Skip::Unreadable(why) if why.contains("too long")),
        );
    }
}
