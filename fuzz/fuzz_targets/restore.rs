//! `GuestMemfd::restore` on hostile input: a small file made from the
//! input (private runs, written pages), snapshotted, then cut and changed
//! as the input says, or replaced by raw bytes. An unchanged snapshot must
//! restore to the same states; any change must be a typed error (`EINVAL`
//! or `EBADMSG`); nothing may panic.

#![no_main]

use gmem::{Attribute, Flags, GuestMemfd, Options, PAGE_SIZE};
use libfuzzer_sys::arbitrary::{self, Unstructured};
use libfuzzer_sys::fuzz_target;

const PAGES: u64 = 16;

struct Input {
    private: Vec<(u8, u8)>,
    written: Vec<(u8, u8)>,
    changes: Vec<(u16, u8)>,
    cut: Option<u16>,
    raw: Option<Vec<u8>>,
}

impl Input {
    fn new(u: &mut Unstructured<'_>) -> arbitrary::Result<Input> {
        Ok(Input {
            private: u.arbitrary()?,
            written: u.arbitrary()?,
            changes: u.arbitrary()?,
            cut: u.arbitrary()?,
            raw: u.arbitrary()?,
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::new(&mut Unstructured::new(data)) else {
        return;
    };
    if let Some(raw) = input.raw {
        let error = GuestMemfd::restore(&raw[..], Options::new()).unwrap_err();
        assert!([libc::EINVAL, libc::EBADMSG].contains(&error.errno()), "{error}");
        return;
    }
    let mem = GuestMemfd::new(PAGES * PAGE_SIZE, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    let map = mem.mmap().unwrap();
    for (page, byte) in input.written {
        let page = u64::from(page) % PAGES;
        map.write(page * PAGE_SIZE, &[byte; 64]).unwrap();
    }
    for (page, len) in input.private {
        let page = u64::from(page) % PAGES;
        let len = (u64::from(len) % (PAGES - page)).max(1);
        mem.set_attributes(page * PAGE_SIZE, len * PAGE_SIZE, Attribute::Private)
            .unwrap();
    }
    let mut good = Vec::new();
    mem.snapshot(&mut good).unwrap();
    let mut bad = good.clone();
    for (index, xor) in input.changes {
        let index = usize::from(index) % bad.len();
        bad[index] ^= xor;
    }
    if let Some(cut) = input.cut {
        bad.truncate(usize::from(cut) % good.len());
    }
    match GuestMemfd::restore(&bad[..], Options::new()) {
        Ok(copy) => {
            assert_eq!(bad, good, "a changed snapshot was restored");
            assert_eq!(copy.shared_runs(), mem.shared_runs());
        }
        Err(error) => {
            assert_ne!(bad, good, "a valid snapshot was refused: {error}");
            assert!([libc::EINVAL, libc::EBADMSG].contains(&error.errno()), "{error}");
        }
    }
});
