//! Folios: the units of reference counting. The file's pages are cut into
//! 2 MiB chunks, made on first pin; each chunk is either 512 small folios
//! (one [`PageRef`] a page) or, on a file with huge folios, one huge folio
//! counted in the chunk's folio word.
//!
//! A chunk is huge only while its whole range has one state. It is split to
//! small folios before part of it changes state, and merged back when its
//! range is uniform again (after a conversion or a punch) and no page holds a
//! reference. Mode changes happen under the invalidate lock held exclusively
//! and only on folios without references, so a pin's folios keep their mode
//! while it lives.

use std::ops::Range;
use std::sync::OnceLock;

use crate::refs::PageRef;

/// Pages per chunk: one 2 MiB huge folio.
pub(crate) const CHUNK_PAGES: u64 = 512;

/// The reference counts of one 2 MiB chunk.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// The huge folio's count and bits, when the chunk is huge.
    pub(crate) folio: PageRef,
    /// The small folios' counts, when it is not.
    pub(crate) pages: [PageRef; CHUNK_PAGES as usize],
}

impl Chunk {
    fn new(huge: bool) -> Box<Chunk> {
        let pages: Box<[PageRef]> = (0..CHUNK_PAGES).map(|_| PageRef::new()).collect();
        let pages: Box<[PageRef; CHUNK_PAGES as usize]> =
            pages.try_into().expect("CHUNK_PAGES entries");
        let chunk = Box::new(Chunk {
            folio: PageRef::new(),
            pages: *pages,
        });
        chunk.folio.set_huge(huge);
        chunk
    }

    /// The small folios of `pages` (inside this chunk).
    #[inline(always)]
    pub(crate) fn pages(&self, pages: Range<u64>) -> &[PageRef] {
        let start = (pages.start % CHUNK_PAGES) as usize;
        &self.pages[start..start + (pages.end - pages.start) as usize]
    }
}

/// The chunks of one file.
#[derive(Debug)]
pub(crate) struct FolioTable {
    chunks: Box<[OnceLock<Box<Chunk>>]>,
    pages: u64,
    huge_folios: bool,
}

impl FolioTable {
    /// The table of a file of `pages` pages, or `None` if its first level
    /// (one slot per 2 MiB) cannot be allocated.
    pub(crate) fn new(pages: u64, huge_folios: bool) -> Option<FolioTable> {
        let count = usize::try_from(pages.div_ceil(CHUNK_PAGES)).ok()?;
        let mut chunks = Vec::new();
        chunks.try_reserve_exact(count).ok()?;
        chunks.resize_with(count, OnceLock::new);
        Some(FolioTable {
            chunks: chunks.into_boxed_slice(),
            pages,
            huge_folios,
        })
    }

    /// Whether the file counts references per huge folio at all.
    pub(crate) fn has_huge_folios(&self) -> bool {
        self.huge_folios
    }

    /// Whether `chunk` is a huge folio now (never on a file without them:
    /// one load saved on every pin of such a file).
    #[inline(always)]
    pub(crate) fn is_huge(&self, chunk: &Chunk) -> bool {
        self.huge_folios && chunk.folio.is_huge()
    }

    /// The chunk holding `page`, if made.
    #[inline(always)]
    pub(crate) fn chunk(&self, page: u64) -> Option<&Chunk> {
        self.chunks[(page / CHUNK_PAGES) as usize]
            .get()
            .map(|c| &**c)
    }

    /// The small folios of `pages` when they lie in one made chunk of small
    /// folios: the pin fast path's one lookup. `None` otherwise (the range
    /// crosses a chunk, the chunk is not made, or it is one huge folio).
    #[inline(always)]
    pub(crate) fn small_run(&self, pages: Range<u64>) -> Option<&[PageRef]> {
        let chunk = self
            .chunks
            .get((pages.start / CHUNK_PAGES) as usize)?
            .get()?;
        if self.is_huge(chunk) {
            return None;
        }
        let start = (pages.start % CHUNK_PAGES) as usize;
        // Past the chunk's end, `get` says no: the range crosses chunks.
        chunk
            .pages
            .get(start..start + (pages.end - pages.start) as usize)
    }

    /// The chunk holding `page`, made huge if `huge` says its range allows.
    pub(crate) fn chunk_or_make(&self, page: u64, huge: impl FnOnce(Range<u64>) -> bool) -> &Chunk {
        let index = page / CHUNK_PAGES;
        self.chunks[index as usize].get_or_init(|| {
            let range = Self::chunk_range(index);
            Chunk::new(self.may_be_huge(index) && huge(range))
        })
    }

    /// The first page past the chunk holding `page`.
    #[inline(always)]
    pub(crate) fn chunk_end(page: u64) -> u64 {
        (page / CHUNK_PAGES + 1) * CHUNK_PAGES
    }

    /// The pages of chunk `index`.
    pub(crate) fn chunk_range(index: u64) -> Range<u64> {
        index * CHUNK_PAGES..(index + 1) * CHUNK_PAGES
    }

    /// Whether chunk `index` may be a huge folio: the file has huge folios
    /// and the chunk lies wholly inside it.
    pub(crate) fn may_be_huge(&self, index: u64) -> bool {
        self.huge_folios && (index + 1) * CHUNK_PAGES <= self.pages
    }

    /// `pages` cut at chunk boundaries: (chunk index, pages in it).
    pub(crate) fn segments(pages: Range<u64>) -> impl Iterator<Item = (u64, Range<u64>)> {
        let mut page = pages.start;
        std::iter::from_fn(move || {
            (page < pages.end).then(|| {
                let index = page / CHUNK_PAGES;
                let end = ((index + 1) * CHUNK_PAGES).min(pages.end);
                let segment = page..end;
                page = end;
                (index, segment)
            })
        })
    }

    /// The made chunks overlapping `pages`, with the pages of each.
    pub(crate) fn made(
        &self,
        pages: Range<u64>,
    ) -> impl Iterator<Item = (u64, &Chunk, Range<u64>)> {
        Self::segments(pages).filter_map(|(index, segment)| {
            self.chunks[index as usize]
                .get()
                .map(|c| (index, &**c, segment))
        })
    }

    /// Chunks in huge mode.
    pub(crate) fn huge_count(&self) -> u64 {
        self.chunks
            .iter()
            .filter(|c| c.get().is_some_and(|c| c.folio.is_huge()))
            .count() as u64
    }

    /// Bytes of metadata.
    pub(crate) fn footprint(&self) -> u64 {
        let made = self.chunks.iter().filter(|c| c.get().is_some()).count();
        (std::mem::size_of_val(&*self.chunks) + made * std::mem::size_of::<Chunk>()) as u64
    }
}
