//! How the file form moves an extent's contents and checksums them: a
//! kernel-side copy ([`Mover`]: `copy_file_range`, else `sendfile`, else
//! `pread`/`pwrite` through a buffer) and the CRC of the same bytes read
//! by a helper thread while the copy runs, or by the caller when the helper
//! has not got to them ([`Checksums`]).

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{Builder, Scope};

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use super::format::EXTENT_HEAD_LEN;
use super::{CHUNK, SnapshotError, read_at, write_at};

/// How a snapshot's extent contents were moved between guest memory and
/// the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyMethod {
    /// Through a buffer in this process: `pread(2)` and a write, or a read
    /// and `pwrite(2)`. The stream form always; the file form when the
    /// kernel copies below are refused.
    Buffered,
    /// `copy_file_range(2)`, in the kernel.
    CopyFileRange,
    /// `sendfile(2)`, in the kernel: when `copy_file_range` is refused
    /// (`EXDEV` between file systems, as from a memfd to a file on disk;
    /// `EINVAL`, `ENOSYS`, `EOPNOTSUPP`).
    Sendfile,
}

/// The most bytes handed to one kernel copy.
const MAX_COPY: u64 = 1 << 30;

/// Copies byte ranges from one file to another by the best method the two
/// allow, falling back for the rest of the operation when one is refused.
pub(super) struct Mover {
    pub(super) method: CopyMethod,
    buf: Vec<u8>,
}

impl Mover {
    pub(super) fn new(method: CopyMethod) -> Mover {
        Mover {
            method,
            buf: Vec::new(),
        }
    }

    /// Copies `len` bytes of `from` at `from_at` to `to` at `to_at`; the
    /// bytes copied, fewer than `len` only if `from` ends first. Errors of
    /// a kernel copy are the stream's ([`SnapshotError::Stream`]).
    pub(super) fn copy(
        &mut self,
        from: BorrowedFd<'_>,
        mut from_at: u64,
        to: BorrowedFd<'_>,
        mut to_at: u64,
        len: u64,
    ) -> Result<u64, SnapshotError> {
        let end = from_at + len;
        while from_at < end {
            let want = (end - from_at).min(MAX_COPY) as usize;
            let done = match self.method {
                CopyMethod::CopyFileRange => {
                    let copied = rustix::fs::copy_file_range(
                        from,
                        Some(&mut from_at),
                        to,
                        Some(&mut to_at),
                        want,
                    );
                    match copied {
                        Err(errno) if refused(errno) => {
                            self.method = CopyMethod::Sendfile;
                            continue;
                        }
                        other => other.map_err(kernel_copy("copy_file_range"))?,
                    }
                }
                CopyMethod::Sendfile => {
                    rustix::fs::seek(to, SeekFrom::Start(to_at)).map_err(kernel_copy("lseek"))?;
                    match rustix::fs::sendfile(to, from, Some(&mut from_at), want) {
                        Err(errno) if refused(errno) => {
                            self.method = CopyMethod::Buffered;
                            continue;
                        }
                        Ok(n) => {
                            to_at += n as u64;
                            n
                        }
                        Err(errno) => Err(kernel_copy("sendfile")(errno))?,
                    }
                }
                CopyMethod::Buffered => {
                    let n = self.through_buffer(from, from_at, to, to_at, want)?;
                    from_at += n as u64;
                    to_at += n as u64;
                    n
                }
            };
            if done == 0 {
                return Ok(len - (end - from_at));
            }
        }
        Ok(len)
    }

    /// One chunk read with `pread` and written with `pwrite`: the bytes
    /// copied, 0 at the end of `from`. Errors are the stream's, as a kernel
    /// copy's are.
    fn through_buffer(
        &mut self,
        from: BorrowedFd<'_>,
        from_at: u64,
        to: BorrowedFd<'_>,
        to_at: u64,
        want: usize,
    ) -> Result<usize, SnapshotError> {
        self.buf.resize(CHUNK, 0);
        let chunk = &mut self.buf[..want.min(CHUNK)];
        let n = read_at(from, chunk, from_at).map_err(kernel_copy("pread"))?;
        write_at(to, &chunk[..n], to_at).map_err(kernel_copy("pwrite"))?;
        Ok(n)
    }
}

/// Whether a kernel copy's errno says "not between these two files", so
/// the next method may be tried.
fn refused(errno: Errno) -> bool {
    [Errno::XDEV, Errno::INVAL, Errno::NOSYS, Errno::OPNOTSUPP].contains(&errno)
}

fn kernel_copy(call: &'static str) -> impl FnOnce(Errno) -> SnapshotError {
    move |errno| SnapshotError::Stream { call, errno }
}

/// An extent to checksum: its head, then `len` bytes of a file at `at`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Job {
    pub(super) head: [u8; EXTENT_HEAD_LEN],
    pub(super) at: u64,
    pub(super) len: u64,
}

/// How a failed or short `pread` of the checksummed file is reported.
pub(super) type ReadError = fn(Errno) -> SnapshotError;

/// The CRC-32 of `job`: its head and its bytes of `fd`, read a chunk at a
/// time into `buf`; a read error or an early end is `error`'s.
fn checksum(
    fd: BorrowedFd<'_>,
    job: &Job,
    buf: &mut [u8],
    error: ReadError,
) -> Result<u32, SnapshotError> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&job.head);
    let end = job.at + job.len;
    let mut at = job.at;
    while at < end {
        let chunk = &mut buf[..(end - at).min(CHUNK as u64) as usize];
        if read_at(fd, chunk, at).map_err(error)? < chunk.len() {
            return Err(error(Errno::IO));
        }
        crc.update(chunk);
        at += chunk.len() as u64;
    }
    Ok(crc.finalize())
}

/// The checksums of extents of one file, shared between the caller and a
/// helper thread (started at the first job, reading with `pread` into its
/// own buffer). The helper takes the jobs in order; the caller, when it
/// reaches a job the helper has not started (the helper has no CPU, or
/// could not be started), takes it itself, while the bytes it just copied
/// may still be in its cache. So with a free CPU the checksums run beside
/// the copies, and without one they cost what they would on one thread.
pub(super) struct Checksums<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    fd: BorrowedFd<'scope>,
    error: ReadError,
    shared: Arc<Shared>,
    /// Whether the helper was started, or failed to start.
    tried: bool,
    buf: Vec<u8>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a job is pushed or done, and when the caller leaves.
    changed: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// Each job's checksum once done (taken by the caller).
    done: Vec<Option<Result<u32, SnapshotError>>>,
    /// The first job nobody has started.
    next: usize,
    /// The caller is gone: the helper stops.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The helper: takes the next job, checksums it, records it; until the
    /// caller leaves.
    fn serve(&self, fd: BorrowedFd<'_>, error: ReadError) {
        let mut buf = vec![0u8; CHUNK];
        let mut queue = self.lock();
        loop {
            if queue.closed {
                return;
            }
            if queue.next == queue.jobs.len() {
                queue = self.changed.wait(queue).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let k = queue.next;
            let job = queue.jobs[k];
            queue.next += 1;
            drop(queue);
            let result = checksum(fd, &job, &mut buf, error);
            queue = self.lock();
            queue.done[k] = Some(result);
            self.changed.notify_all();
        }
    }
}

impl<'scope, 'env> Checksums<'scope, 'env> {
    /// Checksums of extents of `fd`, with a helper on a thread of `scope`
    /// if one starts; `error` reports a failed read.
    pub(super) fn new(
        scope: &'scope Scope<'scope, 'env>,
        fd: BorrowedFd<'scope>,
        error: ReadError,
    ) -> Checksums<'scope, 'env> {
        Checksums {
            scope,
            fd,
            error,
            shared: Arc::default(),
            tried: false,
            buf: Vec::new(),
        }
    }

    /// Queues a job: its number.
    pub(super) fn push(&mut self, job: Job) -> usize {
        if !self.tried {
            self.tried = true;
            let (shared, fd, error) = (Arc::clone(&self.shared), self.fd, self.error);
            // Without a helper the caller takes every job.
            drop(
                Builder::new()
                    .name("gmem-snapshot-crc".into())
                    .spawn_scoped(self.scope, move || shared.serve(fd, error)),
            );
        }
        let mut queue = self.shared.lock();
        queue.jobs.push(job);
        queue.done.push(None);
        self.shared.changed.notify_all();
        queue.jobs.len() - 1
    }

    /// Checksums job `k`, and any before it, now if nobody has started
    /// them.
    pub(super) fn help(&mut self, k: usize) {
        loop {
            let mut queue = self.shared.lock();
            if queue.next > k {
                return;
            }
            let j = queue.next;
            queue.next += 1;
            let job = queue.jobs[j];
            drop(queue);
            self.buf.resize(CHUNK, 0);
            let result = checksum(self.fd, &job, &mut self.buf, self.error);
            self.shared.lock().done[j] = Some(result);
        }
    }

    /// The checksum of job `k`, helping with it or waiting for it; taken
    /// once.
    pub(super) fn take(&mut self, k: usize) -> Result<u32, SnapshotError> {
        self.help(k);
        let mut queue = self.shared.lock();
        loop {
            if let Some(result) = queue.done[k].take() {
                return result;
            }
            queue = self
                .shared
                .changed
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Checksums<'_, '_> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// With the helper and without it (the caller takes every job), each
    /// job's checksum is that of its head and bytes, whatever order the
    /// caller helps and takes in; a read past the end is the error given.
    #[test]
    fn checksums_with_and_without_the_helper() {
        let file = rustix::fs::memfd_create("sums", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let bytes: Vec<u8> = (0..3 * CHUNK + 5).map(|i| (i % 241) as u8).collect();
        write_at(file.as_fd(), &bytes, 0).unwrap();
        let jobs = [
            (0, 10),
            (7, 2 * CHUNK as u64 + 3),
            (CHUNK as u64, CHUNK as u64),
        ];
        let expected = |(at, len): (u64, u64)| {
            let mut crc = crc32fast::Hasher::new();
            crc.update(&[at as u8; EXTENT_HEAD_LEN]);
            crc.update(&bytes[at as usize..(at + len) as usize]);
            crc.finalize()
        };
        for helper in [true, false] {
            std::thread::scope(|scope| {
                let mut sums = Checksums::new(scope, file.as_fd(), |errno| SnapshotError::Stream {
                    call: "pread",
                    errno,
                });
                sums.tried = !helper;
                for (at, len) in jobs {
                    sums.push(Job {
                        head: [at as u8; EXTENT_HEAD_LEN],
                        at,
                        len,
                    });
                }
                sums.help(1);
                for (k, job) in jobs.into_iter().enumerate().rev() {
                    assert_eq!(sums.take(k), Ok(expected(job)), "{helper} {k}");
                }
                let past = sums.push(Job {
                    head: [0; EXTENT_HEAD_LEN],
                    at: 3 * CHUNK as u64,
                    len: 6,
                });
                let error = SnapshotError::Stream {
                    call: "pread",
                    errno: Errno::IO,
                };
                assert_eq!(sums.take(past), Err(error));
            });
        }
    }
}
