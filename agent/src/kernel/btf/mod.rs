//! A minimal reader of raw kernel BTF (`/sys/kernel/btf/vmlinux`), enough to find where members
//! of a kernel struct sit. The kernel programs read `struct sock_common` at these offsets, which
//! differ between kernels and configurations.
//!
//! Raw BTF is a header, a type section and a string section. The type section is a sequence of
//! variable-length records whose length depends on their kind, so every kind must be skipped
//! correctly to reach the struct that matters. Kinds newer than this parser are accepted only
//! when the BTF itself says how long their records are (the proposed "kind layout" section);
//! otherwise parsing stops with [`BtfError::UnknownKind`] rather than misreading what follows.
//!
//! Input is untrusted: every read is bounds-checked, the memory kept is proportional to the
//! input, and recursion through type references is depth-limited against cycles.

use thiserror::Error;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// Header length once `kind_layout_off` and `kind_layout_len` follow `str_len`.
const HEADER_LEN_WITH_KIND_LAYOUT: usize = 32;
const TYPE_RECORD_LEN: usize = 12;
/// Deeper nesting of anonymous members or modifier chains than any real kernel type has;
/// beyond it the input is taken to be cyclic.
const MAX_DEPTH: u32 = 32;
/// Structs and unions one member lookup may visit. A real lookup visits a handful; the cap
/// keeps crafted input (a union holding itself twice, nested 32 deep) from taking 2^32 steps.
const VISIT_BUDGET: u32 = 4096;

pub(crate) mod kind {
    pub const INT: u8 = 1;
    pub const PTR: u8 = 2;
    pub const ARRAY: u8 = 3;
    pub const STRUCT: u8 = 4;
    pub const UNION: u8 = 5;
    pub const ENUM: u8 = 6;
    pub const FWD: u8 = 7;
    pub const TYPEDEF: u8 = 8;
    pub const VOLATILE: u8 = 9;
    pub const CONST: u8 = 10;
    pub const RESTRICT: u8 = 11;
    pub const FUNC: u8 = 12;
    pub const FUNC_PROTO: u8 = 13;
    pub const VAR: u8 = 14;
    pub const DATASEC: u8 = 15;
    pub const FLOAT: u8 = 16;
    pub const DECL_TAG: u8 = 17;
    pub const TYPE_TAG: u8 = 18;
    pub const ENUM64: u8 = 19;
    pub const LAST_KNOWN: u8 = ENUM64;
}

/// Bytes after the 12-byte record header: (fixed part, size of each of `vlen` elements).
fn known_record_layout(kind: u8) -> Option<(usize, usize)> {
    Some(match kind {
        kind::INT => (4, 0),
        kind::ARRAY => (12, 0),
        kind::STRUCT | kind::UNION => (0, 12),
        kind::ENUM => (0, 8),
        kind::FUNC_PROTO => (0, 8),
        kind::VAR => (4, 0),
        kind::DATASEC => (0, 12),
        kind::DECL_TAG => (4, 0),
        kind::ENUM64 => (0, 12),
        kind::PTR
        | kind::FWD
        | kind::TYPEDEF
        | kind::VOLATILE
        | kind::CONST
        | kind::RESTRICT
        | kind::FUNC
        | kind::FLOAT
        | kind::TYPE_TAG => (0, 0),
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BtfError {
    #[error("{len} bytes is too short for a BTF header")]
    TooShort { len: usize },
    #[error("not BTF: the magic bytes are {found:02x?}")]
    BadMagic { found: [u8; 2] },
    #[error("BTF version {0} is not supported (only version 1 is)")]
    UnsupportedVersion(u8),
    #[error("BTF header length {hdr_len} is invalid for {len} bytes of input")]
    BadHeaderLength { hdr_len: u32, len: usize },
    #[error("BTF {section} section (bytes {start}..{end}) lies outside the {len} bytes of input")]
    SectionOutOfBounds {
        section: &'static str,
        start: u64,
        end: u64,
        len: usize,
    },
    #[error("BTF type {type_id} at byte {offset} of the type section runs past the section's end")]
    Truncated { type_id: u32, offset: usize },
    #[error(
        "BTF type {type_id} has kind {kind}, which this parser does not know and the BTF does not \
         describe, so the types after it cannot be found"
    )]
    UnknownKind { type_id: u32, kind: u8 },
}

/// Where a member sits inside the named struct, relative to the struct's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberLocation {
    pub bit_offset: u32,
    /// Width of a bitfield member; 0 for an ordinary member.
    pub bitfield_bits: u32,
    /// Byte size of the member's type (of the storage unit, for a bitfield). `None` for
    /// pointers, whose size BTF leaves to the target, and for types it cannot size.
    pub size: Option<u32>,
}

#[derive(Debug, Clone, Copy)]
enum Detail {
    None,
    Int {
        encoding: u32,
    },
    Array {
        element_type: u32,
        element_count: u32,
    },
    Members {
        first: u32,
        count: u16,
    },
    /// A function prototype's parameters, kept in `members` with offset 0.
    Params {
        first: u32,
        count: u16,
    },
}

#[derive(Debug, Clone, Copy)]
struct TypeEntry {
    name_off: u32,
    kind: u8,
    kind_flag: bool,
    /// `size` for sized kinds, `type` for the referencing ones; BTF overlays the two.
    size_or_type: u32,
    detail: Detail,
}

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Raw: a bit offset, or with the struct's kind_flag `bitfield_size << 24 | bit_offset`.
    offset: u32,
}

/// Parsed BTF: type records indexed by type id (id 0 is `void`) plus the string section.
#[derive(Debug, Clone)]
pub struct Btf {
    types: Vec<TypeEntry>,
    members: Vec<Member>,
    strings: Vec<u8>,
}

/// Bounds-checked reads in the input's byte order.
struct Reader<'a> {
    data: &'a [u8],
    big_endian: bool,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
        self.data.get(at..at.checked_add(N)?)?.try_into().ok()
    }

    fn u32(&self, at: usize) -> Option<u32> {
        let bytes = self.bytes::<4>(at)?;
        Some(if self.big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    }
}

fn section<'a>(
    data: &'a [u8],
    header_len: usize,
    offset: u32,
    len: u32,
    name: &'static str,
) -> Result<&'a [u8], BtfError> {
    let start = header_len as u64 + u64::from(offset);
    let end = start + u64::from(len);
    let out_of_bounds = BtfError::SectionOutOfBounds {
        section: name,
        start,
        end,
        len: data.len(),
    };
    if end > data.len() as u64 {
        return Err(out_of_bounds);
    }
    // Both fit in usize: they are at most data.len().
    Ok(&data[start as usize..end as usize])
}

impl Btf {
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.len() < HEADER_LEN {
            return Err(BtfError::TooShort { len: data.len() });
        }
        let magic = [data[0], data[1]];
        let big_endian = if u16::from_le_bytes(magic) == MAGIC {
            false
        } else if u16::from_be_bytes(magic) == MAGIC {
            true
        } else {
            return Err(BtfError::BadMagic { found: magic });
        };
        if data[2] != 1 {
            return Err(BtfError::UnsupportedVersion(data[2]));
        }
        let reader = Reader { data, big_endian };
        let field = |at: usize| reader.u32(at).unwrap_or(0);
        let hdr_len = field(4);
        if (hdr_len as usize) < HEADER_LEN || hdr_len as usize > data.len() {
            return Err(BtfError::BadHeaderLength {
                hdr_len,
                len: data.len(),
            });
        }
        let header_len = hdr_len as usize;
        let types = section(data, header_len, field(8), field(12), "type")?;
        let strings = section(data, header_len, field(16), field(20), "string")?;
        let kind_layout = if header_len >= HEADER_LEN_WITH_KIND_LAYOUT {
            section(data, header_len, field(24), field(28), "kind layout")
                .ok()
                .and_then(KindLayout::new)
        } else {
            None
        };

        let mut btf = Btf {
            // One entry per 12 bytes at most, so this is bounded by the input.
            types: Vec::with_capacity(types.len() / TYPE_RECORD_LEN + 1),
            members: Vec::new(),
            strings: strings.to_vec(),
        };
        btf.types.push(TypeEntry {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            detail: Detail::None,
        });
        btf.read_types(
            &Reader {
                data: types,
                big_endian,
            },
            kind_layout.as_ref(),
        )?;
        Ok(btf)
    }

    fn read_types(
        &mut self,
        reader: &Reader<'_>,
        kind_layout: Option<&KindLayout>,
    ) -> Result<(), BtfError> {
        let mut at = 0;
        while at < reader.data.len() {
            let type_id = self.types.len() as u32;
            let truncated = BtfError::Truncated {
                type_id,
                offset: at,
            };
            let (Some(name_off), Some(info), Some(size_or_type)) =
                (reader.u32(at), reader.u32(at + 4), reader.u32(at + 8))
            else {
                return Err(truncated);
            };
            let record_kind = ((info >> 24) & 0x1f) as u8;
            let vlen = (info & 0xffff) as u16;
            let kind_flag = info >> 31 == 1;
            let (fixed, per_element) = known_record_layout(record_kind)
                .or_else(|| kind_layout.and_then(|layout| layout.record_layout(record_kind)))
                .ok_or(BtfError::UnknownKind {
                    type_id,
                    kind: record_kind,
                })?;
            let body = at + TYPE_RECORD_LEN;
            let end = body + fixed + per_element * usize::from(vlen);
            if end > reader.data.len() {
                return Err(truncated);
            }
            let detail = match record_kind {
                kind::INT => Detail::Int {
                    encoding: reader.u32(body).unwrap_or(0),
                },
                kind::ARRAY => Detail::Array {
                    element_type: reader.u32(body).unwrap_or(0),
                    element_count: reader.u32(body + 8).unwrap_or(0),
                },
                kind::STRUCT | kind::UNION => {
                    let first = self.members.len() as u32;
                    for index in 0..usize::from(vlen) {
                        let member_at = body + index * 12;
                        self.members.push(Member {
                            name_off: reader.u32(member_at).unwrap_or(0),
                            type_id: reader.u32(member_at + 4).unwrap_or(0),
                            offset: reader.u32(member_at + 8).unwrap_or(0),
                        });
                    }
                    Detail::Members { first, count: vlen }
                }
                kind::FUNC_PROTO => {
                    let first = self.members.len() as u32;
                    for index in 0..usize::from(vlen) {
                        let param_at = body + index * 8;
                        self.members.push(Member {
                            name_off: reader.u32(param_at).unwrap_or(0),
                            type_id: reader.u32(param_at + 4).unwrap_or(0),
                            offset: 0,
                        });
                    }
                    Detail::Params { first, count: vlen }
                }
                _ => Detail::None,
            };
            self.types.push(TypeEntry {
                name_off,
                kind: record_kind,
                kind_flag,
                size_or_type,
                detail,
            });
            at = end;
        }
        Ok(())
    }

    /// Number of types, not counting `void`.
    pub fn type_count(&self) -> usize {
        self.types.len() - 1
    }
}

/// The proposed BTF "kind layout" section: one `{ u8 info_sz; u8 elem_sz; }` per kind, in kind
/// order, so readers can skip kinds they do not know. Not in a released kernel yet (proposed
/// upstream in 2023 and again in 2025); it is trusted only if it agrees with every kind this
/// parser knows, so a differently shaped section is ignored rather than misread.
struct KindLayout {
    /// (info size, element size) per kind number.
    entries: Vec<(u8, u8)>,
}

impl KindLayout {
    fn new(section: &[u8]) -> Option<KindLayout> {
        if section.is_empty() || !section.len().is_multiple_of(2) || section.len() > 2 * 32 {
            return None;
        }
        let entries: Vec<(u8, u8)> = section.chunks_exact(2).map(|e| (e[0], e[1])).collect();
        for (kind_number, &(info, element)) in entries.iter().enumerate().skip(1) {
            if let Some((fixed, per_element)) = known_record_layout(kind_number as u8) {
                if (usize::from(info), usize::from(element)) != (fixed, per_element) {
                    return None;
                }
            }
        }
        Some(KindLayout { entries })
    }

    fn record_layout(&self, record_kind: u8) -> Option<(usize, usize)> {
        if record_kind <= kind::LAST_KNOWN {
            // Kind 0 is invalid in a type section; known kinds never reach here.
            return None;
        }
        let &(info, element) = self.entries.get(usize::from(record_kind))?;
        Some((usize::from(info), usize::from(element)))
    }
}

mod members;

/// Hand-encoded BTF for tests here and in `offsets`.
#[cfg(test)]
pub(crate) mod test_blobs;

#[cfg(test)]
mod tests;
