//! The VM: guest_memfd files of the VM, the memslot table, and the service
//! that performs the guest's conversion requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvm_bindings::{KVM_CAP_EXIT_HYPERCALL, kvm_enable_cap};
use kvm_ioctls::{Kvm, VmFd};

use super::memslot::SlotEntry;
use super::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_HC_MAP_GPA_RANGE,
};
use super::{KvmError, Vcpu, ioctl};
use crate::backing::{Backing, BackingKind};
use crate::{Attribute, ConversionError, Error, Flags, GuestMemfd, Options, PAGE_SIZE};

/// How the VMM retries a guest conversion that failed with `EAGAIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The pause after the first `EAGAIN`; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    /// The longest pause between attempts.
    pub max_backoff: Duration,
}

impl Default for ConversionPolicy {
    fn default() -> Self {
        ConversionPolicy {
            max_attempts: 16,
            first_backoff: Duration::from_micros(20),
            max_backoff: Duration::from_millis(2),
        }
    }
}

/// Counts of the guest's conversion requests served by a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConversionTotals {
    /// Requests served (hypercall, port I/O or memory fault).
    pub requests: u64,
    /// Requests that ended in success.
    pub succeeded: u64,
    /// Requests that ended in an error returned to the guest.
    pub failed: u64,
    /// `EAGAIN`s met and retried after asking device threads to let go.
    pub eagain_retries: u64,
    /// Requests that succeeded after at least one `EAGAIN`.
    pub resolved_after_retry: u64,
}

#[derive(Debug, Default)]
struct Totals {
    requests: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    eagain_retries: AtomicU64,
    resolved_after_retry: AtomicU64,
}

/// Called on `EAGAIN` with the guest-physical range, before the retry: tell
/// the device threads that hold pins there to let go.
pub type LetGo = dyn Fn(u64, u64) + Send + Sync;

/// Shared by the VM handle, its memslots and its vCPUs.
pub(super) struct VmShared {
    // Declared first so it is dropped first: KVM releases every memslot before
    // the files and mappings in `slots` go.
    pub(super) fd: VmFd,
    pub(super) kvm: Kvm,
    id: u64,
    slots: Mutex<Vec<SlotEntry>>,
    policy: Mutex<ConversionPolicy>,
    let_go: Mutex<Option<Arc<LetGo>>>,
    totals: Totals,
}

/// A KVM VM whose memory is gmem files.
#[derive(Clone)]
pub struct Vm {
    pub(super) shared: Arc<VmShared>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM of the default type. Where the host
    /// delivers `KVM_HC_MAP_GPA_RANGE` to userspace, asks for it.
    pub fn new() -> Result<Vm, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Open {
            errno: rustix::io::Errno::from_raw_os_error(e.errno()),
        })?;
        let fd = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        let hypercalls = fd.check_extension_raw(KVM_CAP_EXIT_HYPERCALL.into());
        if hypercalls >= 0 && hypercalls as u64 & (1 << KVM_HC_MAP_GPA_RANGE) != 0 {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_EXIT_HYPERCALL,
                ..Default::default()
            };
            cap.args[0] = 1 << KVM_HC_MAP_GPA_RANGE;
            fd.enable_cap(&cap)
                .map_err(KvmError::ioctl("KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)"))?;
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Vm {
            shared: Arc::new(VmShared {
                fd,
                kvm,
                // Relaxed: a unique number is all that is needed.
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                slots: Mutex::new(Vec::new()),
                policy: Mutex::new(ConversionPolicy::default()),
                let_go: Mutex::new(None),
                totals: Totals::default(),
            }),
        })
    }

    /// A gmem file backed by a kernel guest_memfd of this VM.
    ///
    /// The kernel file is created `MMAP | INIT_SHARED` (this host's kernel
    /// has no per-page state); `flags` are gmem's: `INIT_SHARED` sets the
    /// initial state and `MMAP` whether the host may map it.
    pub fn create_guest_memfd(&self, size: u64, flags: Flags) -> Result<GuestMemfd, Error> {
        self.create_guest_memfd_with(size, flags, Options::default())
    }

    /// [`create_guest_memfd`](Self::create_guest_memfd) with gmem's options.
    pub fn create_guest_memfd_with(
        &self,
        size: u64,
        flags: Flags,
        options: Options,
    ) -> Result<GuestMemfd, Error> {
        GuestMemfd::validate(size, flags)?;
        let needed = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        let supported = self
            .shared
            .fd
            .check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS.into());
        if supported < 0 || supported as u64 & needed != needed {
            return Err(Error::Os {
                call: "KVM_CREATE_GUEST_MEMFD (needs GUEST_MEMFD_FLAG_MMAP | INIT_SHARED)",
                errno: rustix::io::Errno::OPNOTSUPP,
            });
        }
        let fd =
            ioctl::create_guest_memfd(&self.shared.fd, size, needed).map_err(|e| Error::Os {
                call: "KVM_CREATE_GUEST_MEMFD",
                errno: rustix::io::Errno::from_raw_os_error(e.errno()),
            })?;
        let backing = Backing::from_fd(fd, BackingKind::KernelGuestMemfd, Some(self.shared.id));
        GuestMemfd::with_backing(backing, size, flags, options)
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, KvmError> {
        Vcpu::new(self.shared.clone(), id)
    }

    /// Sets how guest conversions that meet `EAGAIN` are retried.
    pub fn set_conversion_policy(&self, policy: ConversionPolicy) {
        *lock(&self.shared.policy) = ConversionPolicy {
            max_attempts: policy.max_attempts.max(1),
            ..policy
        };
    }

    /// Sets what is called on `EAGAIN`, before a retry, with a guest-physical
    /// range: it should make device threads drop their pins there. The range
    /// is the request's, widened to the failing huge folio on files with huge
    /// folios.
    pub fn set_let_go(&self, let_go: Arc<LetGo>) {
        *lock(&self.shared.let_go) = Some(let_go);
    }

    /// Counts of the conversion requests served so far.
    pub fn conversion_totals(&self) -> ConversionTotals {
        let t = &self.shared.totals;
        // Relaxed: statistics.
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConversionTotals {
            requests: get(&t.requests),
            succeeded: get(&t.succeeded),
            failed: get(&t.failed),
            eagain_retries: get(&t.eagain_retries),
            resolved_after_retry: get(&t.resolved_after_retry),
        }
    }

    /// Converts the guest-physical range `[gpa, gpa + pages * 4096)` to `to`,
    /// as the guest's `KVM_HC_MAP_GPA_RANGE` asks, retrying `EAGAIN` under
    /// the conversion policy. Returns the result and the attempts made.
    pub fn convert(
        &self,
        gpa: u64,
        pages: u64,
        to: Attribute,
    ) -> (Result<(), ConversionError>, u32) {
        self.shared.convert(gpa, pages, to)
    }
}

impl VmShared {
    pub(super) fn id(&self) -> u64 {
        self.id
    }

    pub(super) fn slots(&self) -> MutexGuard<'_, Vec<SlotEntry>> {
        lock(&self.slots)
    }

    pub(super) fn convert(
        &self,
        gpa: u64,
        pages: u64,
        to: Attribute,
    ) -> (Result<(), ConversionError>, u32) {
        let t = &self.totals;
        // Relaxed: statistics, here and below.
        t.requests.fetch_add(1, Ordering::Relaxed);
        let len = pages.checked_mul(PAGE_SIZE);
        let Some((mem, offset)) = len.and_then(|len| self.translate(gpa, len)) else {
            t.failed.fetch_add(1, Ordering::Relaxed);
            let invalid = ConversionError::Invalid {
                offset: gpa,
                len: len.unwrap_or(u64::MAX),
                reason: "the guest range is not inside one gmem memslot",
            };
            return (Err(invalid), 1);
        };
        let len = pages * PAGE_SIZE;
        let policy = *lock(&self.policy);
        let mut backoff = policy.first_backoff;
        let mut attempt = 1;
        loop {
            match mem.set_attributes(offset, len, to) {
                Ok(()) => {
                    t.succeeded.fetch_add(1, Ordering::Relaxed);
                    if attempt > 1 {
                        t.resolved_after_retry.fetch_add(1, Ordering::Relaxed);
                    }
                    return (Ok(()), attempt);
                }
                Err(ConversionError::Again { error_offset }) if attempt < policy.max_attempts => {
                    t.eagain_retries.fetch_add(1, Ordering::Relaxed);
                    let let_go = lock(&self.let_go).clone();
                    if let Some(let_go) = let_go {
                        let (start, end) = let_go_range(&mem, offset, len, error_offset);
                        // `start <= offset`: the range begins at or before the request.
                        let_go(gpa.saturating_sub(offset - start), end - start);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(policy.max_backoff);
                    attempt += 1;
                }
                Err(e) => {
                    t.failed.fetch_add(1, Ordering::Relaxed);
                    return (Err(e), attempt);
                }
            }
        }
    }

    /// The file and offset of a guest-physical range inside one memslot.
    fn translate(&self, gpa: u64, len: u64) -> Option<(Arc<GuestMemfd>, u64)> {
        let end = gpa.checked_add(len)?;
        let slots = self.slots();
        let slot = slots
            .iter()
            .find(|s| s.gpa <= gpa && end <= s.gpa + s.len)?;
        Some((slot.mem.clone(), slot.offset + (gpa - slot.gpa)))
    }
}

/// The file range whose pins must go for a conversion of `[offset, offset +
/// len)` that failed at `error_offset`: the request, widened to the folio of
/// the failing page (a pin anywhere in a huge folio blocks it).
fn let_go_range(mem: &GuestMemfd, offset: u64, len: u64, error_offset: u64) -> (u64, u64) {
    // The failing page is inside the request, so inside the file; were it
    // not, the request alone is the range.
    let folio = mem
        .folio_range(error_offset)
        .unwrap_or(offset..offset + len);
    (offset.min(folio.start), (offset + len).max(folio.end))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
