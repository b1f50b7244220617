//! KVM's own memory attributes, kept in step with gmem's attribute map.
//!
//! Where the host has per-VM memory attributes (`KVM_CAP_MEMORY_ATTRIBUTES`
//! with `KVM_MEMORY_ATTRIBUTE_PRIVATE`), a conversion sets them with
//! `KVM_SET_MEMORY_ATTRIBUTES` over the guest-physical ranges of every slot
//! that binds the converted file range; where the guest_memfd takes
//! attributes in place (`KVM_SET_MEMORY_ATTRIBUTES2`), on the file range
//! itself. Either is done by a conversion listener in the commit phase, one
//! per bound file (`memslot.rs` adds it), so that a refusal from KVM undoes
//! the conversion (and the requests already made). This module is the
//! encoding, as pure functions tested without such a host.

use std::ops::Range;
use std::sync::Arc;

use kvm_bindings::kvm_memory_attributes;
use kvm_ioctls::VmFd;
use rustix::io::Errno;

use super::uapi::{KVM_MEMORY_ATTRIBUTE_PRIVATE, KvmMemoryAttributes2};
use crate::Attribute;

/// How conversions keep KVM's own view of private memory in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttributeSyncMode {
    /// Neither interface exists: gmem's attribute map alone decides (a
    /// software-protected VM maps both states for the guest).
    GmemOnly,
    /// Per-VM `KVM_SET_MEMORY_ATTRIBUTES` on guest-physical ranges.
    VmAttributes,
    /// In-place `KVM_SET_MEMORY_ATTRIBUTES2` on the guest_memfd.
    InPlaceAttributes,
}

impl AttributeSyncMode {
    /// The mode for a host whose `KVM_CAP_MEMORY_ATTRIBUTES` is
    /// `vm_attributes` and whose guest_memfd takes in-place attributes or
    /// not; in-place wins where both exist.
    pub fn choose(vm_attributes: u64, in_place: bool) -> AttributeSyncMode {
        if in_place {
            AttributeSyncMode::InPlaceAttributes
        } else if vm_attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0 {
            AttributeSyncMode::VmAttributes
        } else {
            AttributeSyncMode::GmemOnly
        }
    }
}

/// The mode of a VM, with what it needs.
#[derive(Clone)]
pub(super) enum AttributeSync {
    GmemOnly,
    VmAttributes(Arc<VmFd>),
    InPlaceAttributes,
}

impl std::fmt::Debug for AttributeSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.mode().fmt(f)
    }
}

impl AttributeSync {
    pub(super) fn mode(&self) -> AttributeSyncMode {
        match self {
            AttributeSync::GmemOnly => AttributeSyncMode::GmemOnly,
            AttributeSync::VmAttributes(_) => AttributeSyncMode::VmAttributes,
            AttributeSync::InPlaceAttributes => AttributeSyncMode::InPlaceAttributes,
        }
    }
}

/// A slot as the encoding sees it: `[gpa, gpa + len)` is `[offset, offset +
/// len)` of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SlotRange {
    pub(super) gpa: u64,
    pub(super) offset: u64,
    pub(super) len: u64,
}

/// One attribute request to KVM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum AttributeRequest {
    /// `KVM_SET_MEMORY_ATTRIBUTES` on the VM.
    Vm(kvm_memory_attributes),
    /// `KVM_SET_MEMORY_ATTRIBUTES2` on the guest_memfd.
    InPlace(KvmMemoryAttributes2),
}

/// The attribute bits for `to`.
pub(super) fn attribute_bits(to: Attribute) -> u64 {
    match to {
        Attribute::Private => KVM_MEMORY_ATTRIBUTE_PRIVATE,
        Attribute::Shared => 0,
    }
}

/// `KVM_SET_MEMORY_ATTRIBUTES` requests setting the file ranges `runs` to
/// `to`, for every slot of the file that binds part of them.
pub(super) fn vm_requests(
    slots: &[SlotRange],
    runs: &[Range<u64>],
    to: Attribute,
) -> Vec<kvm_memory_attributes> {
    let mut requests = Vec::new();
    for run in runs {
        for slot in slots {
            let start = run.start.max(slot.offset);
            let end = run.end.min(slot.offset + slot.len);
            if start < end {
                requests.push(kvm_memory_attributes {
                    address: slot.gpa + (start - slot.offset),
                    size: end - start,
                    attributes: attribute_bits(to),
                    flags: 0,
                });
            }
        }
    }
    requests
}

/// `KVM_SET_MEMORY_ATTRIBUTES2` requests setting the file ranges `runs` to
/// `to`.
pub(super) fn in_place_requests(runs: &[Range<u64>], to: Attribute) -> Vec<KvmMemoryAttributes2> {
    runs.iter()
        .map(|run| KvmMemoryAttributes2 {
            offset: run.start,
            size: run.end - run.start,
            attributes: attribute_bits(to),
            ..Default::default()
        })
        .collect()
}

/// The request that undoes `request`, made when the range was in the other
/// state throughout.
pub(super) fn undo_request(request: &AttributeRequest) -> AttributeRequest {
    let flip = |bits: u64| bits ^ KVM_MEMORY_ATTRIBUTE_PRIVATE;
    match *request {
        AttributeRequest::Vm(r) => AttributeRequest::Vm(kvm_memory_attributes {
            attributes: flip(r.attributes),
            ..r
        }),
        AttributeRequest::InPlace(r) => AttributeRequest::InPlace(KvmMemoryAttributes2 {
            attributes: flip(r.attributes),
            ..r
        }),
    }
}

/// Makes `requests` in order with `set`; on a failure, undoes the ones made
/// (newest first) and returns the index and errno of the failure, with the
/// errno of a failed undo if one failed too.
pub(super) fn apply_all(
    requests: &[AttributeRequest],
    mut set: impl FnMut(&AttributeRequest) -> Result<(), Errno>,
) -> Result<(), (usize, Errno, Option<Errno>)> {
    for (index, request) in requests.iter().enumerate() {
        if let Err(errno) = set(request) {
            let mut undo_failed = None;
            for done in requests[..index].iter().rev() {
                if let Err(undo) = set(&undo_request(done)) {
                    undo_failed.get_or_insert(undo);
                }
            }
            return Err((index, errno, undo_failed));
        }
    }
    Ok(())
}

/// The parts of `range` (file bytes) not in state `to`, given the file's
/// shared runs in order: what converting `range` to `to` changes.
pub(super) fn changing_runs(
    shared: &[Range<u64>],
    range: Range<u64>,
    to: Attribute,
) -> Vec<Range<u64>> {
    let clipped = shared
        .iter()
        .map(|run| run.start.max(range.start)..run.end.min(range.end))
        .filter(|run| run.start < run.end);
    match to {
        // Becoming private changes the shared runs.
        Attribute::Private => clipped.collect(),
        // Becoming shared changes the gaps between them.
        Attribute::Shared => {
            let mut gaps = Vec::new();
            let mut at = range.start;
            for run in clipped {
                if at < run.start {
                    gaps.push(at..run.start);
                }
                at = run.end;
            }
            if at < range.end {
                gaps.push(at..range.end);
            }
            gaps
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = crate::PAGE_SIZE;

    /// One run, as a slice (clippy reads `&[a..b]` as a mistaken range).
    fn one(run: Range<u64>) -> Vec<Range<u64>> {
        vec![run]
    }

    #[test]
    fn changing_runs_clip_to_the_range() {
        let shared = [0..4, 8..12, 20..24];
        assert_eq!(
            changing_runs(&shared, 2..22, Attribute::Private),
            vec![2..4, 8..12, 20..22]
        );
        assert_eq!(
            changing_runs(&shared, 2..22, Attribute::Shared),
            vec![4..8, 12..20]
        );
        assert_eq!(
            changing_runs(&shared, 12..20, Attribute::Shared),
            vec![12..20]
        );
        assert_eq!(changing_runs(&shared, 12..20, Attribute::Private), vec![]);
        assert_eq!(changing_runs(&[], 0..8, Attribute::Shared), vec![0..8]);
    }

    #[test]
    fn the_mode_prefers_in_place_attributes() {
        use AttributeSyncMode::*;
        assert_eq!(AttributeSyncMode::choose(0, false), GmemOnly);
        assert_eq!(
            AttributeSyncMode::choose(!KVM_MEMORY_ATTRIBUTE_PRIVATE, false),
            GmemOnly
        );
        assert_eq!(
            AttributeSyncMode::choose(KVM_MEMORY_ATTRIBUTE_PRIVATE, false),
            VmAttributes
        );
        assert_eq!(
            AttributeSyncMode::choose(KVM_MEMORY_ATTRIBUTE_PRIVATE, true),
            InPlaceAttributes
        );
    }

    #[test]
    fn vm_requests_cover_every_slot_binding_the_runs() {
        // Two slots of one file: file [0, 4P) at 1 MiB, file [8P, 12P) at 2 MiB.
        let slots = [
            SlotRange {
                gpa: 1 << 20,
                offset: 0,
                len: 4 * P,
            },
            SlotRange {
                gpa: 2 << 20,
                offset: 8 * P,
                len: 4 * P,
            },
        ];
        // One run spans the end of the first slot, the gap and the second.
        let requests = vm_requests(&slots, &[2 * P..10 * P, 11 * P..16 * P], Attribute::Private);
        let got: Vec<_> = requests
            .iter()
            .map(|r| (r.address, r.size, r.attributes, r.flags))
            .collect();
        let private = KVM_MEMORY_ATTRIBUTE_PRIVATE;
        assert_eq!(
            got,
            vec![
                ((1 << 20) + 2 * P, 2 * P, private, 0),
                (2 << 20, 2 * P, private, 0),
                ((2 << 20) + 3 * P, P, private, 0),
            ]
        );
        let shared = vm_requests(&slots, &one(0..P), Attribute::Shared);
        assert_eq!(
            shared,
            vec![kvm_memory_attributes {
                address: 1 << 20,
                size: P,
                attributes: 0,
                flags: 0
            }]
        );
        assert!(vm_requests(&slots, &one(4 * P..8 * P), Attribute::Shared).is_empty());
    }

    #[test]
    fn in_place_requests_name_file_ranges() {
        let requests = in_place_requests(&[0..P, 4 * P..6 * P], Attribute::Private);
        assert_eq!(requests.len(), 2);
        assert_eq!((requests[1].offset, requests[1].size), (4 * P, 2 * P));
        assert_eq!(requests[1].attributes, KVM_MEMORY_ATTRIBUTE_PRIVATE);
        assert_eq!(
            (
                requests[1].flags,
                requests[1].error_offset,
                requests[1].reserved
            ),
            (0, 0, [0; 11])
        );
        assert_eq!(
            in_place_requests(&one(0..P), Attribute::Shared)[0].attributes,
            0
        );
    }

    #[test]
    fn a_refused_request_undoes_the_earlier_ones() {
        let requests: Vec<_> =
            in_place_requests(&[0..P, P..2 * P, 2 * P..3 * P], Attribute::Private)
                .into_iter()
                .map(AttributeRequest::InPlace)
                .collect();
        let mut made = Vec::new();
        let result = apply_all(&requests, |r| {
            let AttributeRequest::InPlace(r) = r else {
                unreachable!()
            };
            if r.offset == 2 * P {
                return Err(Errno::AGAIN);
            }
            made.push((r.offset, r.attributes));
            Ok(())
        });
        assert_eq!(result, Err((2, Errno::AGAIN, None)));
        let private = KVM_MEMORY_ATTRIBUTE_PRIVATE;
        assert_eq!(made, vec![(0, private), (P, private), (P, 0), (0, 0)]);
        // A failing undo is reported, and the other undos are still made.
        let mut calls = Vec::new();
        let result = apply_all(&requests, |r| {
            let AttributeRequest::InPlace(r) = r else {
                unreachable!()
            };
            calls.push((r.offset, r.attributes));
            match (r.offset, r.attributes) {
                (o, 0) if o == P => Err(Errno::NOMEM),
                (o, _) if o == 2 * P => Err(Errno::AGAIN),
                _ => Ok(()),
            }
        });
        assert_eq!(result, Err((2, Errno::AGAIN, Some(Errno::NOMEM))));
        assert_eq!(
            calls.last(),
            Some(&(0, 0)),
            "the undo of the first was made too"
        );
    }
}
