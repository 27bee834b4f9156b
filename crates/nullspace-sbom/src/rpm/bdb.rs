//! rpm's BerkeleyDB database (rpm 4.x before 4.16, RHEL/CentOS 7-8):
//! `var/lib/rpm/Packages`, a Berkeley DB *hash* database keyed by header
//! number, each value one header blob.
//!
//! Written here rather than taken from crates.io: the one rpmdb crate there
//! (rpmdb 0.1) is a single unmaintained release that opens paths (not
//! bytes, so no ext4 image) and pins an older rusqlite whose SQLite would
//! clash with the one sqlx links; the other Berkeley DB crates read 1.85
//! btrees only. rpm always created `Packages` with DB_HASH, so only the
//! hash access method is read; its btree indexes (Name, Basenames, ...)
//! are not needed and not read.
//!
//! Every page is visited in order and its key/value pairs read, following
//! overflow chains for large values: no bucket arithmetic, every offset
//! checked against the page, every chain bounded by the page count.

use crate::SbomError;

const HASH_MAGIC: u32 = 0x0006_1561;
const BTREE_MAGIC: u32 = 0x0005_3162;
/// Page types (Berkeley DB's db_page.h).
const P_HASH_UNSORTED: u8 = 2;
const P_OVERFLOW: u8 = 7;
const P_HASHMETA: u8 = 8;
const P_HASH: u8 = 13;
/// Item types on hash pages.
const H_KEYDATA: u8 = 1;
const H_OFFPAGE: u8 = 3;
/// The page header (lsn, pgno, prev, next, entries, hf_offset, level, type).
const PAGE_HEADER: usize = 26;

#[derive(Clone, Copy)]
struct Order(bool); // true: little-endian

impl Order {
    fn u32(self, b: &[u8], at: usize) -> Option<u32> {
        let s: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if self.0 {
            u32::from_le_bytes(s)
        } else {
            u32::from_be_bytes(s)
        })
    }
    fn u16(self, b: &[u8], at: usize) -> Option<u16> {
        let s: [u8; 2] = b.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if self.0 {
            u16::from_le_bytes(s)
        } else {
            u16::from_be_bytes(s)
        })
    }
}

/// Calls `each` with every value of the database whose key is not rpm's
/// reserved record 0.
pub(crate) fn values(
    path: &str,
    file: &[u8],
    mut each: impl FnMut(&[u8]) -> Result<(), SbomError>,
) -> Result<(), SbomError> {
    let bad = |reason: String| SbomError::corrupt(path, reason);
    let order = if Order(true).u32(file, 12) == Some(HASH_MAGIC) {
        Order(true)
    } else if Order(false).u32(file, 12) == Some(HASH_MAGIC) {
        Order(false)
    } else if [true, false]
        .iter()
        .any(|&le| Order(le).u32(file, 12) == Some(BTREE_MAGIC))
    {
        return Err(bad(
            "a Berkeley DB btree; rpm's Packages is a hash database".into(),
        ));
    } else {
        return Err(bad("not a Berkeley DB hash database (no hash magic)".into()));
    };
    let page_size = order.u32(file, 20).unwrap_or(0) as usize;
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(bad(format!(
            "page size {page_size} is not a power of two in 512..=65536"
        )));
    }
    if file.len() < page_size {
        return Err(bad(format!(
            "{} bytes, shorter than its {page_size}-byte meta page",
            file.len()
        )));
    }
    if file[24] != 0 || file[26] & 0x01 != 0 {
        return Err(bad(
            "encrypted or checksummed pages (rpm writes neither)".into()
        ));
    }
    if file[25] != P_HASHMETA {
        return Err(bad(format!(
            "page 0 has type {}, not a hash meta page",
            file[25]
        )));
    }
    let pages = file.len() / page_size;
    // Each overflow page belongs to one chain in a sound database, so all
    // chains together hold less than the file: more means shared pages, and
    // reading them again for every reference could take quadratic time.
    let mut budget = file.len();
    let page = |n: usize| -> Option<&[u8]> {
        file.get(n.checked_mul(page_size)?..(n + 1).checked_mul(page_size)?)
    };
    for n in 1..pages {
        let Some(p) = page(n) else { break };
        if !matches!(p[25], P_HASH | P_HASH_UNSORTED) {
            continue;
        }
        let entries = order.u16(p, 20).unwrap_or(0) as usize;
        if !entries.is_multiple_of(2) {
            return Err(bad(format!(
                "hash page {n} has an odd entry count {entries}"
            )));
        }
        let item = |i: usize| -> Result<&[u8], SbomError> {
            let at = |j: usize| order.u16(p, PAGE_HEADER + 2 * j).map(usize::from);
            let start = at(i).ok_or_else(|| bad(format!("page {n}: index {i} past the page")))?;
            let end = if i == 0 { Some(page_size) } else { at(i - 1) };
            match end {
                Some(end)
                    if start >= PAGE_HEADER + 2 * entries && start < end && end <= page_size =>
                {
                    Ok(&p[start..end])
                }
                _ => Err(bad(format!(
                    "page {n}: item {i} at {start} outside its page"
                ))),
            }
        };
        for pair in 0..entries / 2 {
            let key = item(2 * pair)?;
            if key[0] == H_KEYDATA && key[1..].iter().all(|&b| b == 0) {
                continue; // rpm's record 0 holds a counter, not a header
            }
            let value = item(2 * pair + 1)?;
            match value[0] {
                H_KEYDATA => each(&value[1..])?,
                H_OFFPAGE => {
                    let first = order.u32(value, 4);
                    let total = order.u32(value, 8);
                    let (Some(first), Some(total)) = (first, total) else {
                        return Err(bad(format!("page {n}: a truncated overflow reference")));
                    };
                    let total = total as usize;
                    budget = budget.checked_sub(total).ok_or_else(|| {
                        bad("overflow values add up to more than the file".into())
                    })?;
                    let data = overflow(path, file, order, page_size, first as usize, total)?;
                    each(&data)?;
                }
                t => {
                    return Err(bad(format!(
                        "page {n}: item type {t} (duplicates are not rpm's)"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// The `total` bytes of a value spread over a chain of overflow pages.
fn overflow(
    path: &str,
    file: &[u8],
    order: Order,
    page_size: usize,
    mut n: usize,
    total: usize,
) -> Result<Vec<u8>, SbomError> {
    let bad = |reason: String| SbomError::corrupt(path, reason);
    if total > file.len() {
        return Err(bad(format!(
            "an overflow value of {total} bytes in a {}-byte file",
            file.len()
        )));
    }
    let mut out = Vec::with_capacity(total);
    // A chain visits each page at most once: more hops than pages is a cycle.
    for _ in 0..file.len() / page_size {
        let p = n
            .checked_mul(page_size)
            .and_then(|s| file.get(s..s + page_size))
            .ok_or_else(|| bad(format!("overflow page {n} past the end of the file")))?;
        if p[25] != P_OVERFLOW {
            return Err(bad(format!("page {n} has type {}, not overflow", p[25])));
        }
        let len = order.u16(p, 22).unwrap_or(0) as usize;
        let chunk = p
            .get(PAGE_HEADER..PAGE_HEADER + len)
            .ok_or_else(|| bad(format!("overflow page {n} claims {len} bytes")))?;
        if out.len() + chunk.len() > total {
            return Err(bad(format!("overflow chain longer than its {total} bytes")));
        }
        out.extend_from_slice(chunk);
        let next = order.u32(p, 16).unwrap_or(0) as usize;
        if next == 0 {
            return if out.len() == total {
                Ok(out)
            } else {
                Err(bad(format!(
                    "overflow chain holds {} of {total} bytes",
                    out.len()
                )))
            };
        }
        n = next;
    }
    Err(bad("an overflow chain that loops".into()))
}
