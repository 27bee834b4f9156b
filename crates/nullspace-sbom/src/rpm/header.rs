//! A bounded reader of the rpm header blobs both rpm databases store: the
//! header without its 8-byte magic, `il` (index entries) and `dl` (data
//! bytes) as big-endian u32s, `il` 16-byte entries, then the data store.
//! Every offset is checked against the blob before it is read.

/// rpm refuses headers past these (rpm's `hdrblobVerifyInfo` limits).
const MAX_INDEX: u32 = 0x0000_ffff;
const MAX_DATA: u32 = 0x0fff_ffff;

const TYPE_INT32: u32 = 4;
const TYPE_STRING: u32 = 6;
const TYPE_STRING_ARRAY: u32 = 8;
const TYPE_I18NSTRING: u32 = 9;

pub const TAG_NAME: i32 = 1000;
pub const TAG_VERSION: i32 = 1001;
pub const TAG_RELEASE: i32 = 1002;
pub const TAG_EPOCH: i32 = 1003;
pub const TAG_LICENSE: i32 = 1014;
pub const TAG_ARCH: i32 = 1022;

/// A header whose index was checked to lie within the blob.
pub struct Header<'a> {
    index: &'a [u8],
    data: &'a [u8],
}

impl<'a> Header<'a> {
    pub fn parse(blob: &'a [u8]) -> Result<Self, String> {
        let il = be32(blob, 0).ok_or("header shorter than its 8-byte preamble")?;
        let dl = be32(blob, 4).ok_or("header shorter than its 8-byte preamble")?;
        if il == 0 || il > MAX_INDEX {
            return Err(format!("header index count {il} outside 1..={MAX_INDEX}"));
        }
        if dl > MAX_DATA {
            return Err(format!("header data length {dl} over {MAX_DATA}"));
        }
        let index_len = il as usize * 16;
        let end = 8 + index_len + dl as usize;
        if blob.len() < end {
            return Err(format!(
                "header declares {end} bytes but its record holds {}",
                blob.len()
            ));
        }
        Ok(Header {
            index: &blob[8..8 + index_len],
            data: &blob[8 + index_len..end],
        })
    }

    /// (type, offset, count) of the first entry with `tag`.
    fn entry(&self, tag: i32) -> Option<(u32, usize, u32)> {
        self.index.chunks_exact(16).find_map(|e| {
            let t = be32(e, 0)? as i32;
            (t == tag).then(|| Some((be32(e, 4)?, be32(e, 8)? as usize, be32(e, 12)?)))?
        })
    }

    /// A string tag (the first string of an array or i18n table);
    /// `Ok(None)` when absent, an error when it points outside the data.
    pub fn string(&self, tag: i32) -> Result<Option<String>, String> {
        let Some((ty, offset, count)) = self.entry(tag) else {
            return Ok(None);
        };
        if !matches!(ty, TYPE_STRING | TYPE_STRING_ARRAY | TYPE_I18NSTRING) || count == 0 {
            return Err(format!("tag {tag} has type {ty}, not a string"));
        }
        let rest = self
            .data
            .get(offset..)
            .ok_or_else(|| format!("tag {tag} at offset {offset} past the data"))?;
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| format!("tag {tag}: string not NUL-terminated"))?;
        Ok(Some(String::from_utf8_lossy(&rest[..len]).into_owned()))
    }

    pub fn int32(&self, tag: i32) -> Result<Option<u32>, String> {
        let Some((ty, offset, count)) = self.entry(tag) else {
            return Ok(None);
        };
        if ty != TYPE_INT32 || count == 0 {
            return Err(format!("tag {tag} has type {ty}, not int32"));
        }
        be32(self.data, offset)
            .map(Some)
            .ok_or_else(|| format!("tag {tag} at offset {offset} past the data"))
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}
