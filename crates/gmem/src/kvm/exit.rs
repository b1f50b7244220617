//! The guest's conversion requests, as a VMM's own `VcpuFd::run()` loop sees
//! them: `KVM_EXIT_HYPERCALL` with `KVM_HC_MAP_GPA_RANGE` and
//! `KVM_EXIT_MEMORY_FAULT`, validated as KVM does and served through the
//! [`GpaMap`]. gmem's own [`Vcpu::run`](super::Vcpu::run) uses the same code,
//! and its port-I/O request the same validation and result.

use kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE;
use kvm_ioctls::VcpuExit;

use super::gpa_map::{ConversionOutcome, GpaMap};
use super::uapi::{
    KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
    KVM_MAP_GPA_RANGE_PAGE_SZ_MASK,
};
use crate::{Attribute, ConversionError, PAGE_SHIFT, PAGE_SIZE};

/// How a conversion request reached the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestChannel {
    /// `KVM_EXIT_HYPERCALL` with `KVM_HC_MAP_GPA_RANGE`.
    Hypercall,
    /// A write to [`CONVERSION_PORT`](super::CONVERSION_PORT).
    PortIo,
    /// A `KVM_EXIT_MEMORY_FAULT`: the guest touched a page in the other state.
    MemoryFault,
}

/// A conversion the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionRequest {
    /// The guest-physical start.
    pub gpa: u64,
    /// The number of pages.
    pub pages: u64,
    /// The state asked for.
    pub to: Attribute,
    /// How the request arrived.
    pub channel: RequestChannel,
}

/// A conversion exit served: what was asked and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversionExit {
    /// The request.
    pub request: ConversionRequest,
    /// Its outcome. For a hypercall, `kvm_run.hypercall.ret` has been set
    /// to [`ConversionOutcome::guest_ret`].
    pub outcome: ConversionOutcome,
}

/// Checks `KVM_HC_MAP_GPA_RANGE` arguments as KVM does before it exits (a
/// page-aligned address, at least one page, no wrap of the frame number)
/// and the attributes as its uapi defines them (only the encryption bit and
/// a page size of 4 KiB, 2 MiB or 1 GiB). Returns the state asked for.
pub fn map_gpa_range_target(gpa: u64, pages: u64, attrs: u64) -> Result<Attribute, &'static str> {
    if gpa % PAGE_SIZE != 0 {
        return Err("the address is not page-aligned");
    }
    let gfn = gpa >> PAGE_SHIFT;
    if pages == 0 || gfn.checked_add(pages).is_none_or(|end| end <= gfn) {
        return Err("the page count is zero or the range wraps");
    }
    if attrs & !(KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_MASK) != 0 {
        return Err("unknown attribute bits");
    }
    if attrs & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK > KVM_MAP_GPA_RANGE_PAGE_SZ_1G {
        return Err("undefined page size");
    }
    Ok(if attrs & KVM_MAP_GPA_RANGE_ENCRYPTED != 0 {
        Attribute::Private
    } else {
        Attribute::Shared
    })
}

impl GpaMap {
    /// Serves a conversion exit of a VMM's own run loop; `None` for any
    /// other exit (including hypercalls other than `KVM_HC_MAP_GPA_RANGE`),
    /// which the VMM handles itself.
    ///
    /// * `VcpuExit::Hypercall` with `KVM_HC_MAP_GPA_RANGE`: validates the
    ///   arguments ([`map_gpa_range_target`]; malformed ones are `EINVAL`
    ///   without a conversion), converts, and sets `*ret` to 0 or the
    ///   negative errno, which KVM returns to the guest when it re-enters.
    /// * `VcpuExit::MemoryFault`: converts the faulting pages to what the
    ///   access expected (private if `KVM_MEMORY_EXIT_FLAG_PRIVATE` is set);
    ///   re-enter the guest if the outcome is `Ok`.
    pub fn handle_exit(&self, exit: &mut VcpuExit<'_>) -> Option<ConversionExit> {
        match exit {
            VcpuExit::Hypercall(call) if call.nr == KVM_HC_MAP_GPA_RANGE => {
                let [gpa, pages, attrs, ..] = call.args;
                let served = self.serve_map_gpa_range(gpa, pages, attrs, RequestChannel::Hypercall);
                *call.ret = served.outcome.guest_ret();
                Some(served)
            }
            VcpuExit::MemoryFault { flags, gpa, size } => {
                let private = *flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0;
                Some(self.serve_memory_fault(*gpa, *size, private))
            }
            _ => None,
        }
    }

    /// Serves a `KVM_HC_MAP_GPA_RANGE` request however it arrived; the
    /// guest's result is [`ConversionOutcome::guest_ret`].
    pub fn serve_map_gpa_range(
        &self,
        gpa: u64,
        pages: u64,
        attrs: u64,
        channel: RequestChannel,
    ) -> ConversionExit {
        let to = match map_gpa_range_target(gpa, pages, attrs) {
            Ok(to) => to,
            Err(reason) => {
                let invalid = ConversionError::Invalid {
                    offset: gpa,
                    len: pages.saturating_mul(PAGE_SIZE),
                    reason,
                };
                let request = ConversionRequest {
                    gpa,
                    pages,
                    to: Attribute::Shared,
                    channel,
                };
                let outcome = ConversionOutcome {
                    result: Err(invalid),
                    attempts: 0,
                    failed_gpa: Some(gpa),
                    rollback_failures: Vec::new(),
                };
                return ConversionExit { request, outcome };
            }
        };
        let request = ConversionRequest {
            gpa,
            pages,
            to,
            channel,
        };
        let outcome = self.convert(gpa, pages, to);
        ConversionExit { request, outcome }
    }

    /// Converts the pages of a memory fault at `[gpa, gpa + size)`.
    fn serve_memory_fault(&self, gpa: u64, size: u64, private: bool) -> ConversionExit {
        let to = if private {
            Attribute::Private
        } else {
            Attribute::Shared
        };
        let start = gpa & !(PAGE_SIZE - 1);
        let end = gpa.saturating_add(size).div_ceil(PAGE_SIZE);
        let pages = end.saturating_sub(start >> PAGE_SHIFT);
        let request = ConversionRequest {
            gpa: start,
            pages,
            to,
            channel: RequestChannel::MemoryFault,
        };
        let outcome = self.convert(start, pages, to);
        ConversionExit { request, outcome }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_gpa_range_arguments_are_checked_as_kvm_does() {
        let enc = KVM_MAP_GPA_RANGE_ENCRYPTED;
        assert_eq!(map_gpa_range_target(0x2000, 1, enc), Ok(Attribute::Private));
        assert_eq!(map_gpa_range_target(0x2000, 1, 0), Ok(Attribute::Shared));
        assert_eq!(
            map_gpa_range_target(0x2000, 512, enc | 1),
            Ok(Attribute::Private)
        );
        assert!(map_gpa_range_target(0x2001, 1, 0).is_err(), "unaligned");
        assert!(map_gpa_range_target(0x2000, 0, 0).is_err(), "no pages");
        assert!(
            map_gpa_range_target(0x2000, u64::MAX - 1, 0).is_err(),
            "wraps"
        );
        assert!(map_gpa_range_target(0, 1, 1 << 5).is_err(), "unknown bit");
        assert!(map_gpa_range_target(0, 1, 3).is_err(), "page size 3");
    }
}
