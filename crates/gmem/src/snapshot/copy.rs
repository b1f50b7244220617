//! How the file form moves an extent's contents and checksums them: a
//! kernel-side copy ([`Mover`]: `copy_file_range`, else `sendfile`, else
//! `pread`/`pwrite` through a buffer) and the CRC of the same bytes read
//! by a helper thread while the copy runs ([`Checksums`]).

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::{Builder, Scope, ScopedJoinHandle};

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use super::format::EXTENT_HEAD_LEN;
use super::{CHUNK, SnapshotError, read_at, write_at};
use crate::Error;

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

/// The checksums of extents of one file, in the order they are pushed,
/// computed by a helper thread (started at the first job, reading the file
/// with `pread` into its own buffer) while the caller copies; by the
/// caller, when it asks, if no thread could be started.
pub(super) struct Checksums<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    fd: BorrowedFd<'scope>,
    error: ReadError,
    worker: Option<Worker<'scope>>,
    /// Whether a worker was started, or failed to start.
    tried: bool,
    /// Jobs not yet checksummed, without a worker.
    pending: VecDeque<Job>,
    buf: Vec<u8>,
}

struct Worker<'scope> {
    jobs: Sender<Job>,
    results: Receiver<Result<u32, SnapshotError>>,
    handle: ScopedJoinHandle<'scope, ()>,
}

impl<'scope, 'env> Checksums<'scope, 'env> {
    /// Checksums of extents of `fd`, on a thread of `scope` if one starts;
    /// `error` reports a failed read.
    pub(super) fn new(
        scope: &'scope Scope<'scope, 'env>,
        fd: BorrowedFd<'scope>,
        error: ReadError,
    ) -> Checksums<'scope, 'env> {
        Checksums {
            scope,
            fd,
            error,
            worker: None,
            tried: false,
            pending: VecDeque::new(),
            buf: Vec::new(),
        }
    }

    /// The helper thread, if it starts.
    fn spawn(&self) -> Option<Worker<'scope>> {
        let (jobs, job_rx) = channel::<Job>();
        let (result_tx, results) = channel();
        let (fd, error) = (self.fd, self.error);
        let spawned = Builder::new()
            .name("gmem-snapshot-crc".into())
            .spawn_scoped(self.scope, move || {
                let mut buf = vec![0u8; CHUNK];
                for job in job_rx {
                    let result = checksum(fd, &job, &mut buf, error);
                    let failed = result.is_err();
                    // The caller stopped listening (it failed): stop too.
                    if result_tx.send(result).is_err() || failed {
                        break;
                    }
                }
            });
        let handle = spawned.ok()?;
        Some(Worker {
            jobs,
            results,
            handle,
        })
    }

    pub(super) fn push(&mut self, job: Job) {
        if !self.tried {
            self.tried = true;
            self.worker = self.spawn();
        }
        match &self.worker {
            // A worker gone (after an error it reports) takes no more jobs.
            Some(worker) => worker.jobs.send(job).unwrap_or(()),
            None => self.pending.push_back(job),
        }
    }

    /// The checksum of the oldest job pushed and not yet taken, waiting for
    /// it. Called once a job.
    pub(super) fn next(&mut self) -> Result<u32, SnapshotError> {
        if let Some(worker) = &self.worker {
            return match worker.results.recv() {
                Ok(result) => result,
                // The worker ended without a result: it panicked, or it
                // already sent an error.
                Err(_) => {
                    if let Some(Err(panic)) = self.worker.take().map(|w| w.handle.join()) {
                        std::panic::resume_unwind(panic);
                    }
                    Err(Error::os("checksumming")(Errno::IO).into())
                }
            };
        }
        let job = self.pending.pop_front().expect("a job was pushed");
        self.buf.resize(CHUNK, 0);
        checksum(self.fd, &job, &mut self.buf, self.error)
    }
}
