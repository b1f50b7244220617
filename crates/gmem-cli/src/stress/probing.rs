//! The probing listener of `gmem stress`: in every phase of every
//! conversion it pins, reads and queries one page of the file (in the range,
//! beside it, or anywhere), checks each result against what the phase
//! allows, keeps the pins it takes in a commit phase until the conversion
//! is done (so that they meet the folio split that follows), and now and
//! then panics, which the converting worker catches.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use gmem::{Attribute, ConversionListener, Error, GuestMemfd, HostMapping, OwnedPin, Refusal};

use super::{P, Shadow};

/// The payload of the listener's panics: the worker that converted catches
/// exactly this and goes on.
pub(super) const PANIC: &str = "gmem stress: the probing listener panics on purpose";

/// One call in this many panics.
const PANIC_ONE_IN: u64 = 97;

/// The phase a callback runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Before,
    Commit,
    Converted,
}

/// Pins, reads and queries from inside callbacks (see the module doc).
pub(super) struct Probing {
    file: Weak<GuestMemfd>,
    /// Its own mapping: none can be made from a callback.
    map: HostMapping,
    shadow: Arc<Shadow>,
    huge_folios: bool,
    calls: AtomicU64,
    /// Pins taken (and reads made) that the phase allowed.
    pub(super) granted: AtomicU64,
    /// Pins and reads refused as the phase requires.
    pub(super) refused: AtomicU64,
    pub(super) panics: AtomicU64,
    /// Pins taken in a commit phase, dropped once the conversion is done.
    kept: Mutex<Vec<OwnedPin>>,
}

impl Probing {
    /// A listener probing `file`, reporting to `shadow`.
    pub(super) fn new(file: &Arc<GuestMemfd>, shadow: Arc<Shadow>) -> anyhow::Result<Probing> {
        Ok(Probing {
            file: Arc::downgrade(file),
            map: file.mmap()?,
            shadow,
            huge_folios: file.options().huge_folios,
            calls: AtomicU64::new(0),
            granted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            panics: AtomicU64::new(0),
            kept: Mutex::new(Vec::new()),
        })
    }

    /// Drops the pins kept from commit phases.
    pub(super) fn release_all(&self) {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// One probe of a callback of `phase` for `[offset, offset + len)` to
    /// `to`.
    fn probe(&self, phase: Phase, offset: u64, len: u64, to: Attribute) {
        let call = self.calls.fetch_add(1, Relaxed);
        if call % PANIC_ONE_IN == PANIC_ONE_IN - 1 {
            self.panics.fetch_add(1, Relaxed);
            std::panic::panic_any(PANIC);
        }
        let Some(file) = self.file.upgrade() else {
            return;
        };
        if phase == Phase::Converted {
            self.release_all();
        }
        let range = offset / P..(offset + len) / P;
        let page = self.pick(call, &range, file.size() / P);
        // Served from the map the conversion holds: before it is stored for
        // `Before` and `Commit`, after for `Converted`.
        let state = file.attribute(page * P).expect("a page of the file");
        let _ = file.stats();
        let in_flight = phase == Phase::Commit && to == Attribute::Private && range.contains(&page);
        let hidden = in_flight || state == Attribute::Private;
        // Pins in the huge folios around a range in flight are refused too.
        let chunk = |p: u64| p / 512;
        let beside = self.huge_folios
            && phase == Phase::Commit
            && to == Attribute::Private
            && (chunk(page) == chunk(range.start) || chunk(page) == chunk(range.end - 1));
        let what =
            format!("{phase:?} of {offset:#x}+{len:#x} to {to:?}, page {page:#x} ({state:?})");
        match file.pin_owned(page * P, P) {
            Ok(pin) if hidden => {
                self.violation(format!("{what}: a pin was granted"));
                drop(pin);
            }
            Ok(pin) => {
                self.granted.fetch_add(1, Relaxed);
                if phase == Phase::Commit {
                    self.kept
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(pin);
                }
            }
            Err(Error::Private { .. }) if hidden || beside => {
                self.refused.fetch_add(1, Relaxed);
            }
            Err(err) => self.violation(format!("{what}: the pin failed with {err}")),
        }
        let mut buf = [0u8; 8];
        match self.map.read(page * P, &mut buf) {
            Ok(()) if hidden => self.violation(format!("{what}: a checked read was served")),
            Ok(()) => {
                self.granted.fetch_add(1, Relaxed);
            }
            Err(Error::Private { .. }) if hidden => {
                self.refused.fetch_add(1, Relaxed);
            }
            Err(err) => self.violation(format!("{what}: the read failed with {err}")),
        }
        self.shadow.listener_checks.fetch_add(1, Relaxed);
    }

    /// The page to probe: in the range, just beside it, or anywhere.
    fn pick(&self, call: u64, range: &std::ops::Range<u64>, pages: u64) -> u64 {
        let mut x = call.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        x ^= x >> 29;
        let len = range.end - range.start;
        match x % 4 {
            0 | 1 => range.start + (x >> 8) % len,
            2 if range.end < pages => range.end,
            2 if range.start > 0 => range.start - 1,
            _ => (x >> 8) % pages,
        }
    }

    fn violation(&self, what: String) {
        self.shadow
            .violation(format!("the probing listener: {what}"));
    }
}

impl ConversionListener for Probing {
    fn before_private(&self, offset: u64, len: u64) -> Result<(), Refusal> {
        self.probe(Phase::Before, offset, len, Attribute::Private);
        Ok(())
    }

    fn commit(&self, offset: u64, len: u64, to: Attribute) -> Result<(), Refusal> {
        self.probe(Phase::Commit, offset, len, to);
        Ok(())
    }

    fn converted(&self, offset: u64, len: u64, to: Attribute) {
        self.probe(Phase::Converted, offset, len, to);
    }
}

/// Silences the panic hook for the probing listener's own panics while it
/// lives (they are caught and counted); any other panic is reported as
/// before.
pub(super) struct QuietPanics(Arc<Hook>);

type Hook = dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync;

impl QuietPanics {
    pub(super) fn install() -> QuietPanics {
        let previous: Arc<Hook> = Arc::from(std::panic::take_hook());
        let hook = previous.clone();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&PANIC) {
                hook(info);
            }
        }));
        QuietPanics(previous)
    }
}

impl Drop for QuietPanics {
    /// Puts the previous hook back.
    fn drop(&mut self) {
        let previous = self.0.clone();
        std::panic::set_hook(Box::new(move |info| previous(info)));
    }
}
