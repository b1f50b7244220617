//! `gmem info`: what this host's KVM supports and how gmem hides private
//! pages here, as text or JSON.

use std::io::{self, Write};

use gmem::kvm::HostSupport;

/// The names of the guest_memfd flags in `mask`.
pub fn flag_names(mask: u64) -> Vec<&'static str> {
    let known = [(1, "MMAP"), (2, "INIT_SHARED")];
    let mut names: Vec<_> = known
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if mask & !3 != 0 {
        names.push("unknown bits");
    }
    names
}

/// The VM types in a `KVM_CAP_VM_TYPES` mask.
pub fn vm_types(mask: u64) -> Vec<u32> {
    (0..64).filter(|t| mask & (1 << t) != 0).collect()
}

/// How a new host mapping of each backing hides private pages here.
pub struct HidingInfo {
    /// On a memfd backing.
    pub memfd: gmem::Hiding,
    /// On a kernel guest_memfd, where this host can make one.
    pub kernel_guest_memfd: Option<gmem::Hiding>,
    /// The VMA budgets of the fallback.
    pub limits: gmem::VmaLimits,
}

impl HidingInfo {
    /// Maps a page of each backing and asks.
    pub fn probe() -> anyhow::Result<HidingInfo> {
        use gmem::{Flags, GuestMemfd, PAGE_SIZE};
        let flags = Flags::MMAP | Flags::INIT_SHARED;
        let memfd = GuestMemfd::new(PAGE_SIZE, flags)?.mmap()?.hiding();
        let kernel_guest_memfd = gmem::kvm::Vm::new()
            .ok()
            .and_then(|vm| vm.create_guest_memfd(PAGE_SIZE, flags).ok())
            .and_then(|mem| mem.mmap().ok())
            .map(|map| map.hiding());
        Ok(HidingInfo {
            memfd,
            kernel_guest_memfd,
            limits: gmem::vma_limits(),
        })
    }

    fn name(hiding: gmem::Hiding) -> &'static str {
        match hiding {
            gmem::Hiding::GuardMarkers => "guard markers",
            gmem::Hiding::EmptyFileRemap => "empty-file remap (one VMA per private run)",
        }
    }

    /// One line: which mechanism, so which fault, on each backing.
    pub fn summary(&self) -> String {
        let fault = |hiding: gmem::Hiding| match hiding {
            gmem::Hiding::GuardMarkers => "guard markers, SIGSEGV",
            gmem::Hiding::EmptyFileRemap => "empty-file remap, SIGBUS",
        };
        let kernel = self.kernel_guest_memfd.map_or("unavailable", fault);
        format!(
            "private pages hidden by: memfd {}; kernel guest_memfd {kernel}",
            fault(self.memfd)
        )
    }

    /// The JSON object of `gmem info --json`'s `hiding`.
    pub fn json(&self) -> serde_json::Value {
        let key = |hiding: gmem::Hiding| match hiding {
            gmem::Hiding::GuardMarkers => "guard_markers",
            gmem::Hiding::EmptyFileRemap => "empty_file_remap",
        };
        serde_json::json!({
            "memfd": key(self.memfd),
            "kernel_guest_memfd": self.kernel_guest_memfd.map(key),
            "max_map_count": self.limits.max_map_count,
            "process_vma_budget": self.limits.process_budget,
            "default_file_vma_budget": self.limits.default_file_budget,
        })
    }

    /// The lines of `gmem info` about hiding.
    pub fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "private pages hidden by      {} (memfd)",
            Self::name(self.memfd)
        )?;
        let kernel = self.kernel_guest_memfd.map_or("unavailable", Self::name);
        writeln!(
            out,
            "                             {kernel} (kernel guest_memfd)"
        )?;
        let limits = &self.limits;
        writeln!(
            out,
            "fallback VMA budget          {} a file, {} the process (vm.max_map_count {})",
            limits.default_file_budget, limits.process_budget, limits.max_map_count
        )
    }
}

/// What `gmem info` says of lazy restore: whether each kind of userfaultfd
/// fault works on a memfd mapping here, or the step that failed.
pub fn lazy_restore_json(probe: &gmem::snapshot::LazyRestoreProbe) -> serde_json::Value {
    let answer = |r: &Result<(), gmem::snapshot::FaultsUnavailable>| match r {
        Ok(()) => serde_json::json!({ "works": true }),
        Err(why) => serde_json::json!({ "works": false, "step": why.step, "errno": why.errno() }),
    };
    serde_json::json!({
        "missing_faults": answer(&probe.missing_faults),
        "minor_faults": answer(&probe.minor_faults),
    })
}

/// The lines of `gmem info` about lazy restore.
pub fn write_lazy_restore(
    probe: &gmem::snapshot::LazyRestoreProbe,
    out: &mut dyn Write,
) -> io::Result<()> {
    let answer = |r: &Result<(), gmem::snapshot::FaultsUnavailable>| match r {
        Ok(()) => "works".to_owned(),
        Err(why) => format!("unavailable: {why}"),
    };
    writeln!(
        out,
        "userfaultfd on memfd         missing faults (UFFDIO_COPY): {}; minor faults (UFFDIO_CONTINUE): {}",
        answer(&probe.missing_faults),
        answer(&probe.minor_faults)
    )?;
    writeln!(
        out,
        "lazy restore                 not built (gmem::snapshot's lazy module says what it needs)"
    )
}

/// `gmem info --json`'s object.
pub fn info_json(support: &HostSupport, hiding: &HidingInfo) -> serde_json::Value {
    serde_json::json!({
        "hiding": hiding.json(),
        "kvm_api_version": support.api_version,
        "guest_memfd": support.guest_memfd,
        "guest_memfd_flags": flag_names(support.guest_memfd_flags),
        "guest_memory": crate::machine::backing_name(support.memory_backing()),
        "memory_attributes": support.memory_attributes,
        "vm_types": vm_types(support.vm_types),
        "user_memory2": support.user_memory2,
        "exit_hypercall_mask": support.exit_hypercall,
        "hypercall_exit_delivered": support.hypercall_exit_delivered,
        "per_page_attributes": support.per_page_attributes,
        "attribute_sync": format!("{:?}", support.attribute_sync()),
        "recommended_vcpus": support.recommended_vcpus,
    })
}

/// The lines of `gmem info` about KVM.
pub fn write_support(support: &HostSupport, out: &mut dyn Write) -> io::Result<()> {
    let yes = |b: bool| if b { "yes" } else { "no" };
    writeln!(out, "KVM API version              {}", support.api_version)?;
    writeln!(
        out,
        "guest_memfd                  {}",
        yes(support.guest_memfd)
    )?;
    writeln!(
        out,
        "guest_memfd flags            {:#x} ({})",
        support.guest_memfd_flags,
        flag_names(support.guest_memfd_flags).join(" | ")
    )?;
    writeln!(
        out,
        "VM memory attributes         {:#x}",
        support.memory_attributes
    )?;
    writeln!(
        out,
        "VM types                     {:?}",
        vm_types(support.vm_types)
    )?;
    writeln!(
        out,
        "KVM_SET_USER_MEMORY_REGION2  {}",
        yes(support.user_memory2)
    )?;
    let memory = match support.memory_backing() {
        gmem::BackingKind::KernelGuestMemfd => "kernel guest_memfd",
        gmem::BackingKind::Memfd => {
            "memfd slots (no usable guest_memfd; gmem's map guards the host)"
        }
    };
    writeln!(out, "guest memory                 {memory}")?;
    writeln!(
        out,
        "hypercall exits              mask {:#x}; KVM_HC_MAP_GPA_RANGE delivered: {}",
        support.exit_hypercall,
        yes(support.hypercall_exit_delivered)
    )?;
    let per_page = if support.per_page_attributes {
        "yes (KVM_SET_MEMORY_ATTRIBUTES2 on guest_memfd)"
    } else {
        "no (gmem's attribute map decides what the host may touch)"
    };
    writeln!(out, "per-page attributes          {per_page}")?;
    let in_step = match support.attribute_sync() {
        gmem::kvm::AttributeSyncMode::GmemOnly => "none (gmem's map alone)",
        gmem::kvm::AttributeSyncMode::VmAttributes => "KVM_SET_MEMORY_ATTRIBUTES per slot",
        gmem::kvm::AttributeSyncMode::InPlaceAttributes => "KVM_SET_MEMORY_ATTRIBUTES2 in place",
    };
    writeln!(out, "KVM attributes kept in step  {in_step}")?;
    let path = if support.hypercall_exit_delivered {
        "hypercall"
    } else {
        "port I/O"
    };
    writeln!(out, "guest conversion requests    {path}")?;
    writeln!(
        out,
        "recommended vCPUs            {}",
        support.recommended_vcpus
    )?;
    Ok(())
}
