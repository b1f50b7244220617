//! A worker of `gmem stress`: one thread's life on the stripe of pages it
//! owns, pinning, converting, punching and copying anywhere in the file and
//! checking every result against the shadow and its own stamps.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Instant;

use gmem::testing::Rng;
use gmem::{Attribute, ConversionError, Error, GuestMemfd, HostMapping, PAGE_SIZE, Pin};

use super::{Counters, Kind, MAX_HELD, Shadow, probing};

const P: u64 = PAGE_SIZE;

/// The bytes of `page` written with `stamp` (0: zeros, as punched or never
/// written).
pub(super) fn fill(page: u64, stamp: u8, out: &mut [u8]) {
    if stamp == 0 {
        out.fill(0);
        return;
    }
    let mut x = (page.wrapping_mul(0x9E37_79B9) ^ (u64::from(stamp) << 40)) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// A pin held by a worker, with the pages the shadow counts for it.
struct Held<'a> {
    pin: Pin<'a>,
    pages: Range<u64>,
}

/// One worker thread's life: the stripe it owns and what it knows of it.
pub(super) struct Worker<'a> {
    mem: &'a GuestMemfd,
    map: &'a HostMapping,
    shadow: &'a Shadow,
    counters: &'a Counters,
    stripe: Range<u64>,
    /// The stamp of each page of the stripe.
    stamps: Vec<u8>,
    next_stamp: u8,
    rng: Rng,
    held: Vec<Held<'a>>,
    buf: Vec<u8>,
    want: Vec<u8>,
}

impl<'a> Worker<'a> {
    /// A worker of `stripe`, whose pages hold `stamps`.
    pub(super) fn new(
        (mem, map, shadow): (&'a GuestMemfd, &'a HostMapping, &'a Shadow),
        counters: &'a Counters,
        stripe: Range<u64>,
        stamps: Vec<u8>,
        seed: u64,
    ) -> Worker<'a> {
        Worker {
            mem,
            map,
            shadow,
            counters,
            stripe,
            stamps,
            next_stamp: 0,
            rng: Rng::new(seed),
            held: Vec::new(),
            buf: Vec::new(),
            want: Vec::new(),
        }
    }

    /// What the stripe's pages hold now.
    pub(super) fn into_stamps(self) -> Vec<u8> {
        self.stamps
    }

    fn pages(&self) -> u64 {
        self.mem.size() / P
    }

    fn violation(&self, what: String) {
        self.shadow.violation(format!(
            "thread of pages {:#x}..{:#x}: {what}",
            self.stripe.start, self.stripe.end
        ));
    }

    fn check(&self) {
        self.counters.add(Kind::Check, 1);
    }

    /// A range of 1 to `max` pages inside the stripe.
    fn own_range(&mut self, max: u64) -> Range<u64> {
        let len = 1 + self.rng.below(max.min(self.stripe.end - self.stripe.start));
        let start = self.stripe.start
            + self
                .rng
                .below(self.stripe.end - self.stripe.start - len + 1);
        start..start + len
    }

    /// A range anywhere in the file: mostly small, sometimes a whole 2 MiB
    /// chunk (huge folios), sometimes large.
    fn any_range(&mut self) -> Range<u64> {
        let pages = self.pages();
        let len = match self.rng.below(20) {
            0 if pages >= 512 => 512,
            1 => 1 + self.rng.below(pages.min(256)),
            _ => 1 + self.rng.below(pages.min(8)),
        };
        let start = if len == 512 {
            self.rng.below(pages / 512) * 512
        } else {
            self.rng.below(pages - len + 1)
        };
        start..start + len
    }

    fn stamp(&mut self) -> u8 {
        self.next_stamp = self.next_stamp.wrapping_add(1).max(1);
        self.next_stamp
    }

    /// Checks `got` (bytes of the stripe from byte `at`) against the stamps.
    fn verify(&mut self, at: u64, got: &[u8], how: &str) {
        let mut want = std::mem::take(&mut self.want);
        want.resize(P as usize, 0);
        let mut offset = at;
        let mut rest = got;
        while !rest.is_empty() {
            let page = offset / P;
            let in_page = (offset % P) as usize;
            let n = rest.len().min(P as usize - in_page);
            fill(
                page,
                self.stamps[(page - self.stripe.start) as usize],
                &mut want,
            );
            if rest[..n] != want[in_page..in_page + n] {
                let first = (0..n).find(|&i| rest[i] != want[in_page + i]).unwrap_or(0);
                self.violation(format!(
                    "{how}: byte {:#x} reads {:#04x}, wrote {:#04x}",
                    offset + first as u64,
                    rest[first],
                    want[in_page + first]
                ));
                break;
            }
            offset += n as u64;
            rest = &rest[n..];
        }
        self.counters.add(Kind::BytesVerified, got.len() as u64);
        self.check();
        self.want = want;
    }

    fn hold(&mut self, pin: Pin<'a>, pages: Range<u64>) {
        for page in pages.clone() {
            self.shadow.pins[page as usize].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.counters.add(Kind::Pin, 1);
        self.held.push(Held { pin, pages });
    }

    fn release(&mut self, index: usize) {
        let held = self.held.swap_remove(index);
        for page in held.pages.clone() {
            self.shadow.pins[page as usize].fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        drop(held);
        self.counters.add(Kind::Unpin, 1);
    }

    /// A pin of `pages` refused: it must be `EFAULT` at a private page.
    fn pin_refused(&mut self, pages: &Range<u64>, err: &Error) {
        match err {
            Error::Private { offset } if offset % P == 0 && pages.contains(&(offset / P)) => {
                self.counters.add(Kind::PinPrivate, 1)
            }
            _ => self.violation(format!(
                "pin of pages {:#x}..{:#x} failed with {err} (errno {})",
                pages.start,
                pages.end,
                err.errno()
            )),
        }
        self.check();
    }

    fn op_pin(&mut self) {
        if self.held.len() >= MAX_HELD {
            let index = self.rng.below(self.held.len() as u64) as usize;
            self.release(index);
        }
        let pages = if self.rng.below(10) < 6 {
            self.own_range(4)
        } else {
            self.any_range()
        };
        // Sometimes unaligned: it still covers whole pages.
        let (offset, len) = match self.rng.below(4) {
            0 => (pages.start * P + 1, (pages.end - pages.start) * P - 2),
            _ => (pages.start * P, (pages.end - pages.start) * P),
        };
        match self.mem.pin(offset, len) {
            Ok(pin) => {
                // Under the pin the pages are shared.
                for page in [pages.start, pages.end - 1] {
                    if self.mem.attribute(page * P).ok() != Some(Attribute::Shared) {
                        self.violation(format!("page {page:#x} is private under a live pin"));
                    }
                    self.check();
                }
                self.hold(pin, pages);
            }
            Err(err) => self.pin_refused(&pages, &err),
        }
    }

    fn op_convert(&mut self) {
        let pages = if self.rng.below(20) == 0 {
            self.stripe.clone()
        } else {
            self.any_range()
        };
        let to = if self.rng.below(2) == 0 {
            Attribute::Private
        } else {
            Attribute::Shared
        };
        let (offset, len) = (pages.start * P, (pages.end - pages.start) * P);
        let converting = || self.mem.set_attributes(offset, len, to);
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(converting)) {
            Ok(result) => result,
            Err(panic) if panic.downcast_ref::<&str>() == Some(&probing::PANIC) => {
                // The thread and the file go on: the next call must work.
                self.counters.add(Kind::ListenerPanic, 1);
                if let Err(err) = self.mem.attribute(offset) {
                    self.violation(format!("after a listener's panic: {err}"));
                }
                return;
            }
            Err(panic) => std::panic::resume_unwind(panic),
        };
        self.check();
        match (to, result) {
            (Attribute::Private, Ok(())) => self.counters.add(Kind::ToPrivate, 1),
            (Attribute::Shared, Ok(())) => self.counters.add(Kind::ToShared, 1),
            (Attribute::Private, Err(ConversionError::Again { error_offset }))
                if error_offset % P == 0 && pages.contains(&(error_offset / P)) =>
            {
                self.counters.add(Kind::ToPrivateEagain, 1)
            }
            (Attribute::Private, Err(ConversionError::Refused { error_offset, .. }))
                if error_offset == offset =>
            {
                self.counters.add(Kind::ToPrivateRefused, 1)
            }
            // The VMA budget (guard mappings' remapped runs) may be spent.
            (_, Err(ConversionError::VmaBudget { error_offset, .. })) if error_offset == offset => {
                self.counters.add(Kind::ConvertNoMemory, 1)
            }
            (to, Err(err)) => self.violation(format!(
                "conversion of {offset:#x}+{len:#x} to {to:?} failed with {err} (errno {})",
                err.errno()
            )),
        }
    }

    fn op_punch(&mut self) {
        let pages = self.own_range(4);
        let (offset, len) = (pages.start * P, (pages.end - pages.start) * P);
        self.check();
        match self.mem.punch_hole(offset, len) {
            Ok(()) => {
                self.counters.add(Kind::Punch, 1);
                for page in pages {
                    self.stamps[(page - self.stripe.start) as usize] = 0;
                }
            }
            Err(Error::Pinned { offset: at }) if at % P == 0 && pages.contains(&(at / P)) => {
                self.counters.add(Kind::PunchBusy, 1)
            }
            Err(err) => self.violation(format!(
                "punch of {offset:#x}+{len:#x} failed with {err} (errno {})",
                err.errno()
            )),
        }
    }

    /// Fills `self.buf` with the stamped contents of `pages`.
    fn stamped(&mut self, pages: &Range<u64>, stamp: u8) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(((pages.end - pages.start) * P) as usize, 0);
        for (page, out) in pages.clone().zip(buf.chunks_mut(P as usize)) {
            fill(page, stamp, out);
        }
        self.buf = buf;
    }

    /// A copy through `map` refused: `EFAULT` at a private page of `pages`.
    fn copy_refused(&mut self, pages: &Range<u64>, err: &Error, what: &str) -> bool {
        self.check();
        match err {
            Error::Private { offset } if offset % P == 0 && pages.contains(&(offset / P)) => true,
            _ => {
                self.violation(format!(
                    "{what} of pages {:#x}..{:#x} failed with {err} (errno {})",
                    pages.start,
                    pages.end,
                    err.errno()
                ));
                false
            }
        }
    }

    fn op_write_mapping(&mut self, map: &HostMapping) {
        let pages = self.own_range(4);
        if pages.end * P > map.len() {
            return;
        }
        let stamp = self.stamp();
        self.stamped(&pages, stamp);
        match map.write(pages.start * P, &self.buf) {
            Ok(()) => {
                self.counters.add(Kind::WriteMapping, 1);
                for page in pages {
                    self.stamps[(page - self.stripe.start) as usize] = stamp;
                }
            }
            Err(err) => {
                if self.copy_refused(&pages, &err, "mapping write") {
                    self.counters.add(Kind::WritePrivate, 1);
                }
            }
        }
    }

    fn op_write_pin(&mut self) {
        let pages = self.own_range(4);
        let len = (pages.end - pages.start) * P;
        let pin = match self.mem.pin(pages.start * P, len) {
            Ok(pin) => pin,
            Err(err) => return self.pin_refused(&pages, &err),
        };
        self.hold(pin, pages.clone());
        let stamp = self.stamp();
        self.stamped(&pages, stamp);
        let held = self.held.last().expect("just held");
        if let Err(err) = held.pin.write(0, &self.buf) {
            self.violation(format!("pin write failed: {err}"));
        }
        for page in pages.clone() {
            self.stamps[(page - self.stripe.start) as usize] = stamp;
        }
        self.counters.add(Kind::WritePin, 1);
        // Read back at once through the same pin, a random part of it.
        let from = self.rng.below(len);
        let n = 1 + self.rng.below(len - from);
        let mut got = vec![0u8; n as usize];
        let held = self.held.last().expect("just held");
        match held.pin.read(from, &mut got) {
            Ok(()) => self.verify(pages.start * P + from, &got, "read back through a pin"),
            Err(err) => self.violation(format!("pin read failed: {err}")),
        }
        // Keep it sometimes.
        if self.rng.below(2) == 0 {
            self.release(self.held.len() - 1);
        }
    }

    fn op_read_mapping(&mut self, map: &HostMapping) {
        let pages = self.own_range(4);
        if pages.end * P > map.len() {
            return;
        }
        // Any byte range within the pages.
        let span = (pages.end - pages.start) * P;
        let from = self.rng.below(span);
        let n = 1 + self.rng.below(span - from);
        let mut got = vec![0u8; n as usize];
        let at = pages.start * P + from;
        match map.read(at, &mut got) {
            Ok(()) => {
                self.counters.add(Kind::Read, 1);
                self.verify(at, &got, "read through a mapping");
            }
            Err(err) => {
                let touched = at / P..(at + n).div_ceil(P);
                if self.copy_refused(&touched, &err, "mapping read") {
                    self.counters.add(Kind::ReadPrivate, 1);
                }
            }
        }
    }

    /// Reads through the held pins: each page shared, own pages exact.
    fn op_read_held(&mut self) {
        for index in 0..self.held.len() {
            let pages = self.held[index].pages.clone();
            let page = pages.start + self.rng.below(pages.end - pages.start);
            if self.mem.attribute(page * P).ok() != Some(Attribute::Shared) {
                self.violation(format!("page {page:#x} is private under a live pin"));
            }
            self.check();
            let pin = &self.held[index].pin;
            // The pin's byte range within the page.
            let start = (page * P).max(pin.offset());
            let end = ((page + 1) * P).min(pin.offset() + pin.len());
            let mut got = vec![0u8; (end - start) as usize];
            if let Err(err) = pin.read(start - pin.offset(), &mut got) {
                self.violation(format!("read through a live pin failed: {err}"));
                continue;
            }
            self.counters.add(Kind::Read, 1);
            if self.stripe.contains(&page) {
                self.verify(start, &got, "read through a held pin");
            }
        }
    }

    /// Copies one own page to another: read through a pin, write through
    /// the mapping.
    fn op_copy(&mut self) {
        let src = self.own_range(1).start;
        let dst = self.own_range(1).start;
        if src == dst {
            return;
        }
        let pin = match self.mem.pin(src * P, P) {
            Ok(pin) => pin,
            Err(err) => return self.pin_refused(&(src..src + 1), &err),
        };
        self.hold(pin, src..src + 1);
        let mut page = vec![0u8; P as usize];
        let held = self.held.last().expect("just held");
        if let Err(err) = held.pin.read(0, &mut page) {
            self.violation(format!("read through a live pin failed: {err}"));
        }
        self.verify(src * P, &page, "copy source read through a pin");
        self.release(self.held.len() - 1);
        // The copy keeps the source's stamp only if the bytes are the
        // source's: rewrite them as dst's pattern of that stamp instead.
        let stamp = self.stamps[(src - self.stripe.start) as usize];
        let map = self.map;
        let mut out = vec![0u8; P as usize];
        fill(dst, stamp, &mut out);
        match map.write(dst * P, &out) {
            Ok(()) => {
                self.stamps[(dst - self.stripe.start) as usize] = stamp;
                self.counters.add(Kind::Copy, 1);
            }
            Err(err) => {
                if self.copy_refused(&(dst..dst + 1), &err, "copy write") {
                    self.counters.add(Kind::WritePrivate, 1);
                }
            }
        }
    }

    /// A short-lived mapping of a random length: writes and reads through it.
    fn op_short_mapping(&mut self) {
        let len = P * (1 + self.rng.below(self.pages() + 2));
        let map = match self.mem.mmap_len(len) {
            Ok(map) => map,
            Err(err) if err.errno() == libc_enomem() => return,
            Err(err) => return self.violation(format!("mmap_len({len:#x}) failed: {err}")),
        };
        self.counters.add(Kind::Mapping, 1);
        for _ in 0..4 {
            if self.rng.below(2) == 0 {
                self.op_write_mapping(&map);
            } else {
                self.op_read_mapping(&map);
            }
        }
    }

    /// Runs `ops` operations or until `deadline`; false once past it.
    pub(super) fn run(&mut self, ops: u64, deadline: Instant, stop: &AtomicBool) -> bool {
        for n in 0..ops {
            if n % 64 == 0 && (Instant::now() >= deadline || stop.load(Relaxed)) {
                return false;
            }
            match self.rng.below(100) {
                0..20 => self.op_pin(),
                20..30 => {
                    if !self.held.is_empty() {
                        let index = self.rng.below(self.held.len() as u64) as usize;
                        self.release(index);
                    }
                }
                30..44 => self.op_convert(),
                44..48 => self.op_punch(),
                48..60 => self.op_write_mapping(self.map),
                60..68 => self.op_write_pin(),
                68..82 => self.op_read_mapping(self.map),
                82..90 => self.op_read_held(),
                90..98 => self.op_copy(),
                _ => {
                    if self.rng.below(8) == 0 {
                        self.op_short_mapping();
                    }
                }
            }
        }
        true
    }

    pub(super) fn release_all(&mut self) {
        while !self.held.is_empty() {
            self.release(self.held.len() - 1);
        }
    }
}

fn libc_enomem() -> i32 {
    rustix::io::Errno::NOMEM.raw_os_error()
}
