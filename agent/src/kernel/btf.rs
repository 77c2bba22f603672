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

    /// Byte offset of `member` in `struct struct_name`, looking through anonymous struct and
    /// union members. `None` when there is no such struct or member, or when the member is a
    /// bitfield or not byte-aligned (a byte offset would not locate it).
    pub fn member_offset(&self, struct_name: &str, member: &str) -> Option<u32> {
        let location = self.member(struct_name, member)?;
        (location.bitfield_bits == 0 && location.bit_offset.is_multiple_of(8))
            .then_some(location.bit_offset / 8)
    }

    /// Full location of `member` in `struct struct_name` (see [`MemberLocation`]). When several
    /// structs share the name, the first that has the member wins.
    pub fn member(&self, struct_name: &str, member: &str) -> Option<MemberLocation> {
        // Anonymous structs are reachable only through the struct that holds them.
        if struct_name.is_empty() {
            return None;
        }
        let mut budget = VISIT_BUDGET;
        self.structs_named(struct_name)
            .find_map(|id| self.find_member(id, member.as_bytes(), 0, 0, &mut budget))
            .map(|(location, _)| location)
    }

    /// Type ids of the structs called `name`.
    fn structs_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = u32> + 'a {
        self.types
            .iter()
            .enumerate()
            .filter_map(move |(id, entry)| {
                (entry.kind == kind::STRUCT && self.name(entry.name_off) == Some(name.as_bytes()))
                    .then_some(id as u32)
            })
    }

    /// Location of a member nested in named members, e.g. `["inet_conn", "icsk_ack",
    /// "lrcvtime"]` in `tcp_sock`, relative to the outer struct's start. Each step but the
    /// last must be a struct or union; anonymous members are looked through at every step.
    pub fn member_path(&self, struct_name: &str, path: &[&str]) -> Option<MemberLocation> {
        let (first, rest) = path.split_first()?;
        if struct_name.is_empty() {
            return None;
        }
        let mut budget = VISIT_BUDGET;
        let (mut location, mut type_id) = self
            .structs_named(struct_name)
            .find_map(|id| self.find_member(id, first.as_bytes(), 0, 0, &mut budget))?;
        for (depth, name) in rest.iter().enumerate() {
            if location.bitfield_bits != 0 {
                return None;
            }
            let container = self.skip_modifiers(type_id, depth as u32)?;
            if !matches!(self.kind_of(container), Some(kind::STRUCT | kind::UNION)) {
                return None;
            }
            (location, type_id) = self.find_member(
                container,
                name.as_bytes(),
                location.bit_offset,
                depth as u32 + 1,
                &mut budget,
            )?;
        }
        Some(location)
    }

    fn find_member(
        &self,
        container: u32,
        wanted: &[u8],
        base_bits: u32,
        depth: u32,
        budget: &mut u32,
    ) -> Option<(MemberLocation, u32)> {
        if depth > MAX_DEPTH || *budget == 0 {
            return None;
        }
        *budget -= 1;
        let entry = self.types.get(container as usize)?;
        let Detail::Members { first, count } = entry.detail else {
            return None;
        };
        let members = self
            .members
            .get(first as usize..first as usize + usize::from(count))?;
        for member in members {
            let (bit_offset, mut bitfield_bits) = if entry.kind_flag {
                (member.offset & 0x00ff_ffff, member.offset >> 24)
            } else {
                (member.offset, 0)
            };
            let mut bit_offset = base_bits.checked_add(bit_offset)?;
            let name = self.name(member.name_off).unwrap_or_default();
            if name.is_empty() {
                let inner = self.skip_modifiers(member.type_id, depth);
                if let Some(inner) =
                    inner.filter(|&id| matches!(self.kind_of(id), Some(kind::STRUCT | kind::UNION)))
                {
                    let found = self.find_member(inner, wanted, bit_offset, depth + 1, budget);
                    if found.is_some() {
                        return found;
                    }
                }
                continue;
            }
            if name != wanted {
                continue;
            }
            let size = self.type_size(member.type_id, depth);
            // Without kind_flag, a bitfield is an INT member whose encoding says it is
            // narrower than its type or starts inside it.
            if !entry.kind_flag {
                if let Some(TypeEntry {
                    detail: Detail::Int { encoding },
                    size_or_type,
                    ..
                }) = self.types.get(member.type_id as usize)
                {
                    let bits = encoding & 0xff;
                    let start = (encoding >> 16) & 0xff;
                    if start != 0 || bits != size_or_type.saturating_mul(8) {
                        bitfield_bits = bits;
                        bit_offset = bit_offset.checked_add(start)?;
                    }
                }
            }
            return Some((
                MemberLocation {
                    bit_offset,
                    bitfield_bits,
                    size,
                },
                member.type_id,
            ));
        }
        None
    }

    /// The C types of a tracepoint's `TP_PROTO` arguments, as a raw tracepoint program receives
    /// them (`["struct sock *", "int", "int"]`), from the kernel's `btf_trace_<event>` typedef;
    /// the leading `void *` every such function takes is left out. Typedefs and qualifiers are
    /// looked through, so `const struct sock *` reads as `struct sock *`. `None` when the
    /// kernel has no such tracepoint or its typedef is not the expected function pointer.
    pub fn raw_tracepoint_args(&self, event: &str) -> Option<Vec<String>> {
        let typedef = format!("btf_trace_{event}");
        let entry = self.types.iter().find(|entry| {
            entry.kind == kind::TYPEDEF && self.name(entry.name_off) == Some(typedef.as_bytes())
        })?;
        let pointer = self
            .types
            .get(self.skip_modifiers(entry.size_or_type, 0)? as usize)?;
        if pointer.kind != kind::PTR {
            return None;
        }
        let proto = self
            .types
            .get(self.skip_modifiers(pointer.size_or_type, 0)? as usize)?;
        let Detail::Params { first, count } = proto.detail else {
            return None;
        };
        let params = self
            .members
            .get(first as usize..first as usize + usize::from(count))?;
        let (context, args) = params.split_first()?;
        if self.describe(context.type_id, 0)? != "void *" {
            return None;
        }
        args.iter()
            .map(|param| self.describe(param.type_id, 0))
            .collect()
    }

    /// A type as C would spell it, enough to compare argument lists.
    fn describe(&self, type_id: u32, depth: u32) -> Option<String> {
        if depth > MAX_DEPTH {
            return None;
        }
        let resolved = self.skip_modifiers(type_id, depth)?;
        if resolved == 0 {
            return Some("void".to_owned());
        }
        let entry = self.types.get(resolved as usize)?;
        let name = || String::from_utf8_lossy(self.name(entry.name_off).unwrap_or_default());
        Some(match entry.kind {
            kind::PTR => format!("{} *", self.describe(entry.size_or_type, depth + 1)?),
            kind::STRUCT => format!("struct {}", name()),
            kind::UNION => format!("union {}", name()),
            kind::FWD if entry.kind_flag => format!("union {}", name()),
            kind::FWD => format!("struct {}", name()),
            kind::ENUM | kind::ENUM64 => format!("enum {}", name()),
            kind::INT | kind::FLOAT => name().into_owned(),
            kind::FUNC_PROTO => "function".to_owned(),
            _ => return None,
        })
    }

    fn kind_of(&self, type_id: u32) -> Option<u8> {
        self.types.get(type_id as usize).map(|entry| entry.kind)
    }

    /// Follows typedefs and qualifiers, which have no layout of their own.
    fn skip_modifiers(&self, mut type_id: u32, depth: u32) -> Option<u32> {
        for _ in depth..=MAX_DEPTH {
            let entry = self.types.get(type_id as usize)?;
            match entry.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    type_id = entry.size_or_type
                }
                _ => return Some(type_id),
            }
        }
        None
    }

    fn type_size(&self, type_id: u32, depth: u32) -> Option<u32> {
        let resolved = self.skip_modifiers(type_id, depth)?;
        let entry = self.types.get(resolved as usize)?;
        match entry.kind {
            kind::INT | kind::ENUM | kind::ENUM64 | kind::STRUCT | kind::UNION | kind::FLOAT => {
                Some(entry.size_or_type)
            }
            kind::ARRAY => {
                let Detail::Array {
                    element_type,
                    element_count,
                } = entry.detail
                else {
                    return None;
                };
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.type_size(element_type, depth + 1)?
                    .checked_mul(element_count)
            }
            _ => None,
        }
    }

    /// The NUL-terminated string at `offset` in the string section.
    fn name(&self, offset: u32) -> Option<&[u8]> {
        let rest = self.strings.get(offset as usize..)?;
        let end = rest.iter().position(|&byte| byte == 0)?;
        Some(&rest[..end])
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

/// Hand-encoded BTF for tests here and in `offsets`.
#[cfg(test)]
pub(crate) mod test_blobs {
    use super::*;

    /// Encodes BTF by hand, in either byte order, so tests control every byte.
    pub struct BlobBuilder {
        types: Vec<u8>,
        pub strings: Vec<u8>,
        pub next_id: u32,
        big_endian: bool,
        pub kind_layout: Option<Vec<u8>>,
    }

    pub struct M<'a>(pub &'a str, pub u32, pub u32, pub u32);

    impl BlobBuilder {
        pub fn new(big_endian: bool) -> Self {
            BlobBuilder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
                big_endian,
                kind_layout: None,
            }
        }

        pub fn put(&mut self, value: u32) {
            let bytes = if self.big_endian {
                value.to_be_bytes()
            } else {
                value.to_le_bytes()
            };
            self.types.extend_from_slice(&bytes);
        }

        pub fn name(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let offset = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            offset
        }

        pub fn record(
            &mut self,
            name: &str,
            kind: u8,
            vlen: u16,
            flag: bool,
            size_or_type: u32,
        ) -> u32 {
            let name_off = self.name(name);
            self.put(name_off);
            self.put((u32::from(flag) << 31) | (u32::from(kind) << 24) | u32::from(vlen));
            self.put(size_or_type);
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        pub fn int(&mut self, name: &str, size: u32) -> u32 {
            self.int_bits(name, size, 0, size * 8)
        }

        pub fn int_bits(&mut self, name: &str, size: u32, start: u32, bits: u32) -> u32 {
            let id = self.record(name, kind::INT, 0, false, size);
            self.put((start << 16) | bits);
            id
        }

        pub fn refers(&mut self, kind: u8, name: &str, to: u32) -> u32 {
            self.record(name, kind, 0, false, to)
        }

        pub fn array(&mut self, element: u32, index: u32, count: u32) -> u32 {
            let id = self.record("", kind::ARRAY, 0, false, 0);
            self.put(element);
            self.put(index);
            self.put(count);
            id
        }

        pub fn composite(
            &mut self,
            kind: u8,
            name: &str,
            size: u32,
            flag: bool,
            members: &[M],
        ) -> u32 {
            let id = self.record(name, kind, members.len() as u16, flag, size);
            for M(member_name, type_id, bit_offset, bits) in members {
                let name_off = self.name(member_name);
                self.put(name_off);
                self.put(*type_id);
                self.put(if flag {
                    (bits << 24) | bit_offset
                } else {
                    *bit_offset
                });
            }
            id
        }

        pub fn with_elements(
            &mut self,
            kind: u8,
            name: &str,
            size_or_type: u32,
            elements: &[&[u32]],
        ) -> u32 {
            let id = self.record(name, kind, elements.len() as u16, false, size_or_type);
            for element in elements {
                for &word in *element {
                    self.put(word);
                }
            }
            id
        }

        pub fn raw_record(&mut self, kind: u8, vlen: u16, payload_words: usize) -> u32 {
            let id = self.record("", kind, vlen, false, 0);
            for _ in 0..payload_words {
                self.put(0xdead_beef);
            }
            id
        }

        pub fn build(&self) -> Vec<u8> {
            let header_len: u32 = if self.kind_layout.is_some() { 32 } else { 24 };
            let word = |value: u32| {
                if self.big_endian {
                    value.to_be_bytes()
                } else {
                    value.to_le_bytes()
                }
            };
            let mut out = Vec::new();
            out.extend_from_slice(&if self.big_endian {
                MAGIC.to_be_bytes()
            } else {
                MAGIC.to_le_bytes()
            });
            out.push(1);
            out.push(0);
            out.extend_from_slice(&word(header_len));
            out.extend_from_slice(&word(0));
            out.extend_from_slice(&word(self.types.len() as u32));
            out.extend_from_slice(&word(self.types.len() as u32));
            out.extend_from_slice(&word(self.strings.len() as u32));
            if let Some(layout) = &self.kind_layout {
                out.extend_from_slice(&word((self.types.len() + self.strings.len()) as u32));
                out.extend_from_slice(&word(layout.len() as u32));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            if let Some(layout) = &self.kind_layout {
                out.extend_from_slice(layout);
            }
            out
        }
    }

    /// One record of every known kind, so a wrong skip rule for any of them shifts every type
    /// after it and breaks the lookups below.
    pub fn add_one_of_every_kind(b: &mut BlobBuilder, int: u32) {
        let ptr = b.refers(kind::PTR, "", int);
        b.with_elements(kind::ENUM, "colour", 4, &[&[0, 1], &[0, 2]]);
        b.with_elements(kind::ENUM64, "wide", 8, &[&[0, 1, 0]]);
        b.refers(kind::FWD, "sock_common", 0);
        b.refers(kind::RESTRICT, "", ptr);
        let proto = b.with_elements(kind::FUNC_PROTO, "", int, &[&[0, int], &[0, ptr]]);
        b.refers(kind::FUNC, "tcp_close", proto);
        let var = b.record("some_var", kind::VAR, 0, false, int);
        b.put(1);
        b.with_elements(kind::DATASEC, ".data", 8, &[&[var, 0, 4], &[var, 4, 4]]);
        b.record("double", kind::FLOAT, 0, false, 8);
        b.record("user", kind::DECL_TAG, 0, false, var);
        b.put(u32::MAX);
        b.refers(kind::TYPE_TAG, "rcu", int);
    }

    /// Mirrors struct sock_common's first 88 bytes as 6.x kernels lay them out: addresses and
    /// ports inside anonymous structs inside anonymous unions, bitfields (hence kind_flag).
    pub fn sock_common_blob(big_endian: bool) -> Vec<u8> {
        let mut b = BlobBuilder::new(big_endian);
        sock_common_into(&mut b, true);
        b.build()
    }

    pub fn sock_common_into(b: &mut BlobBuilder, with_ipv6: bool) {
        let u8_ = b.int("unsigned char", 1);
        let u16_ = b.int("short unsigned int", 2);
        let u32_ = b.int("unsigned int", 4);
        let u64_ = b.int("long long unsigned int", 8);
        let int = b.int("int", 4);
        add_one_of_every_kind(b, int);
        let typedef_u16 = b.refers(kind::TYPEDEF, "__u16", u16_);
        let be16 = b.refers(kind::TYPEDEF, "__be16", typedef_u16);
        let typedef_u32 = b.refers(kind::TYPEDEF, "__u32", u32_);
        let be32 = b.refers(kind::TYPEDEF, "__be32", typedef_u32);
        let addrpair = b.refers(kind::TYPEDEF, "__addrpair", u64_);
        let portpair = b.refers(kind::TYPEDEF, "__portpair", u32_);
        let addresses = b.composite(
            kind::STRUCT,
            "",
            8,
            false,
            &[M("skc_daddr", be32, 0, 0), M("skc_rcv_saddr", be32, 32, 0)],
        );
        let first_union = b.composite(
            kind::UNION,
            "",
            8,
            false,
            &[M("skc_addrpair", addrpair, 0, 0), M("", addresses, 0, 0)],
        );
        let two_u16 = b.array(typedef_u16, int, 2);
        let hash_union = b.composite(
            kind::UNION,
            "",
            4,
            false,
            &[M("skc_hash", u32_, 0, 0), M("skc_u16hashes", two_u16, 0, 0)],
        );
        let ports = b.composite(
            kind::STRUCT,
            "",
            4,
            false,
            &[M("skc_dport", be16, 0, 0), M("skc_num", typedef_u16, 16, 0)],
        );
        let port_union = b.composite(
            kind::UNION,
            "",
            4,
            false,
            &[M("skc_portpair", portpair, 0, 0), M("", ports, 0, 0)],
        );
        let volatile_u8 = b.refers(kind::VOLATILE, "", u8_);
        let sixteen_u8 = b.array(u8_, int, 16);
        let in6_addr = b.composite(
            kind::STRUCT,
            "in6_addr",
            16,
            false,
            &[M("s6_addr", sixteen_u8, 0, 0)],
        );
        let const_in6 = b.refers(kind::CONST, "", in6_addr);
        let mut members = vec![
            M("", first_union, 0, 0),
            M("", hash_union, 64, 0),
            M("", port_union, 96, 0),
            M("skc_family", u16_, 128, 0),
            M("skc_state", volatile_u8, 144, 0),
            M("skc_reuse", u8_, 152, 4),
            M("skc_reuseport", u8_, 156, 1),
            M("skc_bound_dev_if", int, 160, 0),
        ];
        if with_ipv6 {
            members.push(M("skc_v6_daddr", in6_addr, 448, 0));
            members.push(M("skc_v6_rcv_saddr", const_in6, 576, 0));
        }
        b.composite(kind::STRUCT, "sock_common", 88, true, &members);
    }
}

#[cfg(test)]
mod tests {
    use super::test_blobs::*;
    use super::*;

    const SOCK_COMMON_OFFSETS: [(&str, u32, u32); 8] = [
        ("skc_daddr", 0, 4),
        ("skc_rcv_saddr", 4, 4),
        ("skc_dport", 12, 2),
        ("skc_num", 14, 2),
        ("skc_family", 16, 2),
        ("skc_state", 18, 1),
        ("skc_v6_daddr", 56, 16),
        ("skc_v6_rcv_saddr", 72, 16),
    ];

    fn assert_sock_common(btf: &Btf) {
        for (member, offset, size) in SOCK_COMMON_OFFSETS {
            assert_eq!(
                btf.member_offset("sock_common", member),
                Some(offset),
                "{member}"
            );
            assert_eq!(
                btf.member("sock_common", member).unwrap().size,
                Some(size),
                "{member}"
            );
        }
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_structs() {
        let btf = Btf::parse(&sock_common_blob(false)).unwrap();
        assert_sock_common(&btf);
        assert_eq!(btf.member_offset("sock_common", "skc_addrpair"), Some(0));
        assert_eq!(btf.member_offset("sock_common", "skc_hash"), Some(8));
        assert_eq!(
            btf.member_offset("sock_common", "skc_bound_dev_if"),
            Some(20)
        );
        assert_eq!(
            btf.member("sock_common", "skc_u16hashes").unwrap().size,
            Some(4)
        );
        assert_eq!(btf.member_offset("sock_common", "skc_nonexistent"), None);
        assert_eq!(btf.member_offset("in6_addr", "s6_addr"), Some(0));
        // Anonymous structs and unions are reached only as members.
        assert_eq!(btf.member_offset("", "skc_daddr"), None);
        assert_eq!(btf.member_offset("sock", "skc_daddr"), None);
    }

    #[test]
    fn big_endian_btf_gives_the_same_answers() {
        assert_sock_common(&Btf::parse(&sock_common_blob(true)).unwrap());
    }

    #[test]
    fn kind_flag_bitfields_are_located_but_have_no_byte_offset() {
        let btf = Btf::parse(&sock_common_blob(false)).unwrap();
        assert_eq!(
            btf.member("sock_common", "skc_reuse"),
            Some(MemberLocation {
                bit_offset: 152,
                bitfield_bits: 4,
                size: Some(1)
            })
        );
        assert_eq!(
            btf.member("sock_common", "skc_reuseport")
                .unwrap()
                .bit_offset,
            156
        );
        assert_eq!(btf.member_offset("sock_common", "skc_reuse"), None);
    }

    #[test]
    fn int_encoded_bitfields_without_kind_flag() {
        let mut b = BlobBuilder::new(false);
        let int = b.int("int", 4);
        let three_bits = b.int_bits("int", 4, 0, 3);
        let shifted = b.int_bits("int", 4, 5, 8);
        b.composite(
            kind::STRUCT,
            "flags",
            8,
            false,
            &[
                M("whole", int, 0, 0),
                M("low", three_bits, 32, 0),
                M("mid", shifted, 32, 0),
            ],
        );
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.member_offset("flags", "whole"), Some(0));
        assert_eq!(
            btf.member("flags", "low"),
            Some(MemberLocation {
                bit_offset: 32,
                bitfield_bits: 3,
                size: Some(4)
            })
        );
        assert_eq!(btf.member("flags", "mid").unwrap().bit_offset, 37);
        assert_eq!(btf.member_offset("flags", "low"), None);
    }

    #[test]
    fn pointer_members_have_no_size() {
        let mut b = BlobBuilder::new(false);
        let int = b.int("int", 4);
        let ptr = b.refers(kind::PTR, "", int);
        b.composite(kind::STRUCT, "holder", 8, false, &[M("p", ptr, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.member("holder", "p").unwrap().size, None);
        assert_eq!(btf.member_offset("holder", "p"), Some(0));
    }

    #[test]
    fn unknown_kind_without_a_layout_is_a_typed_error() {
        let mut b = BlobBuilder::new(false);
        b.int("int", 4);
        b.raw_record(25, 2, 1 + 2 * 2);
        sock_common_into(&mut b, true);
        assert_eq!(
            Btf::parse(&b.build()).unwrap_err(),
            BtfError::UnknownKind {
                type_id: 2,
                kind: 25
            }
        );
    }

    fn kind_layout_for(unknown_kind: u8, info: u8, element: u8) -> Vec<u8> {
        let mut layout = vec![0u8, 0];
        for kind_number in 1..=unknown_kind {
            let (fixed, per_element) = known_record_layout(kind_number).unwrap_or((0, 0));
            layout.extend_from_slice(&[fixed as u8, per_element as u8]);
        }
        let last = layout.len() - 2;
        layout[last] = info;
        layout[last + 1] = element;
        layout
    }

    #[test]
    fn unknown_kind_is_skipped_when_the_kind_layout_describes_it() {
        let mut b = BlobBuilder::new(false);
        b.int("int", 4);
        // Kind 25: 4 bytes of fixed data, then vlen elements of 8 bytes.
        b.raw_record(25, 2, 1 + 2 * 2);
        sock_common_into(&mut b, true);
        b.kind_layout = Some(kind_layout_for(25, 4, 8));
        assert_sock_common(&Btf::parse(&b.build()).unwrap());
    }

    #[test]
    fn kind_layout_contradicting_known_kinds_is_not_trusted() {
        let mut b = BlobBuilder::new(false);
        b.int("int", 4);
        b.raw_record(25, 2, 1 + 2 * 2);
        let mut layout = kind_layout_for(25, 4, 8);
        layout[2 * kind::STRUCT as usize + 1] = 16; // struct members are 12 bytes, not 16
        b.kind_layout = Some(layout);
        assert_eq!(
            Btf::parse(&b.build()).unwrap_err(),
            BtfError::UnknownKind {
                type_id: 2,
                kind: 25
            }
        );
    }

    #[test]
    fn header_errors() {
        let good = sock_common_blob(false);
        assert_eq!(
            Btf::parse(&good[..10]).unwrap_err(),
            BtfError::TooShort { len: 10 }
        );
        let mut bad = good.clone();
        bad[0] = 0x7f;
        assert!(matches!(Btf::parse(&bad), Err(BtfError::BadMagic { .. })));
        let mut bad = good.clone();
        bad[2] = 2;
        assert_eq!(
            Btf::parse(&bad).unwrap_err(),
            BtfError::UnsupportedVersion(2)
        );
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(
            Btf::parse(&bad),
            Err(BtfError::BadHeaderLength { hdr_len: 8, .. })
        ));
        // A type section claiming 4 GiB must fail on bounds, not try to allocate it.
        let mut bad = good.clone();
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Btf::parse(&bad),
            Err(BtfError::SectionOutOfBounds {
                section: "type",
                ..
            })
        ));
        let mut bad = good;
        bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Btf::parse(&bad),
            Err(BtfError::SectionOutOfBounds {
                section: "string",
                ..
            })
        ));
    }

    #[test]
    fn record_running_past_the_type_section_is_truncated() {
        let mut b = BlobBuilder::new(false);
        b.int("int", 4);
        b.raw_record(kind::STRUCT, 3, 3 * 3 - 1);
        let error = Btf::parse(&b.build()).unwrap_err();
        assert_eq!(
            error,
            BtfError::Truncated {
                type_id: 2,
                offset: 16
            }
        );
    }

    /// xorshift64*: deterministic, dependency-free noise for the robustness tests.
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn query_everything(btf: &Btf) {
        for (member, _, _) in SOCK_COMMON_OFFSETS {
            let _ = btf.member_offset("sock_common", member);
        }
        let _ = btf.member("in6_addr", "s6_addr");
        let _ = btf.member("", "");
        let _ = btf.raw_tracepoint_args("sock_send_length");
    }

    #[test]
    fn every_truncation_fails_cleanly() {
        let good = sock_common_blob(false);
        for len in 0..good.len() {
            // The string section is last, so a cut can leave parseable types with clipped names;
            // either outcome is fine as long as nothing panics.
            if let Ok(btf) = Btf::parse(&good[..len]) {
                query_everything(&btf);
            }
        }
        // Cutting inside the header or type section is always an error.
        let type_section_end = 24 + u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
        for len in 0..type_section_end {
            assert!(Btf::parse(&good[..len]).is_err(), "length {len}");
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let good = sock_common_blob(false);
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        let mut parsed = 0;
        for round in 0..20_000 {
            let mut data = if round % 4 == 0 {
                let len = (noise.next() % 512) as usize;
                let mut bytes: Vec<u8> = (0..len).map(|_| noise.next() as u8).collect();
                if bytes.len() >= 8 && round % 8 == 0 {
                    // A valid prefix gets random bytes past the magic check.
                    bytes[..8].copy_from_slice(&good[..8]);
                }
                bytes
            } else {
                good.clone()
            };
            if round % 4 != 0 {
                for _ in 0..=(noise.next() % 4) {
                    let at = (noise.next() as usize) % data.len();
                    data[at] = noise.next() as u8;
                }
            }
            if let Ok(btf) = Btf::parse(&data) {
                parsed += 1;
                query_everything(&btf);
            }
        }
        // Most single-byte mutations land in names or offsets and still parse; make sure the
        // lookups above actually ran on many of them.
        assert!(parsed > 1000, "only {parsed} inputs parsed");
    }

    #[test]
    fn self_referencing_types_do_not_recurse_forever() {
        let mut b = BlobBuilder::new(false);
        // Type 1: an anonymous union containing itself; type 2: a typedef to itself.
        b.composite(kind::UNION, "", 4, false, &[M("", 1, 0, 0)]);
        b.refers(kind::TYPEDEF, "loop", 2);
        b.composite(
            kind::STRUCT,
            "outer",
            4,
            false,
            &[M("", 1, 0, 0), M("x", 2, 0, 0)],
        );
        // Type 4: a union holding type 5 twice, which holds type 6 twice, ... 40 levels deep,
        // so an unbounded search would take 2^40 steps.
        for _ in 0..40 {
            let next = b.next_id + 1;
            b.composite(
                kind::UNION,
                "",
                4,
                false,
                &[M("", next, 0, 0), M("", next, 0, 0)],
            );
        }
        b.composite(kind::STRUCT, "wide", 4, false, &[M("", 4, 0, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(btf.member("wide", "absent"), None);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(btf.member("outer", "y"), None);
        assert_eq!(
            btf.member("outer", "x").map(|m| (m.bit_offset, m.size)),
            Some((0, None))
        );
    }

    #[test]
    fn raw_tracepoint_args_follow_the_btf_trace_typedef() {
        let mut b = BlobBuilder::new(false);
        let int = b.int("int", 4);
        let sock = b.composite(kind::STRUCT, "sock", 8, false, &[]);
        let const_sock = b.refers(kind::CONST, "", sock);
        let sock_ptr = b.refers(kind::PTR, "", const_sock);
        let void_ptr = b.refers(kind::PTR, "", 0);
        let proto = b.with_elements(
            kind::FUNC_PROTO,
            "",
            0,
            &[&[0, void_ptr], &[0, sock_ptr], &[0, int], &[0, int]],
        );
        let proto_ptr = b.refers(kind::PTR, "", proto);
        b.refers(kind::TYPEDEF, "btf_trace_sock_send_length", proto_ptr);
        // A typedef that is not a function pointer, and one whose first argument is not void *.
        b.refers(kind::TYPEDEF, "btf_trace_not_a_pointer", int);
        let odd = b.with_elements(kind::FUNC_PROTO, "", 0, &[&[0, int], &[0, int]]);
        let odd_ptr = b.refers(kind::PTR, "", odd);
        b.refers(kind::TYPEDEF, "btf_trace_odd", odd_ptr);
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(
            btf.raw_tracepoint_args("sock_send_length").unwrap(),
            ["struct sock *", "int", "int"]
        );
        assert_eq!(btf.raw_tracepoint_args("sock_recv_length"), None);
        assert_eq!(btf.raw_tracepoint_args("not_a_pointer"), None);
        assert_eq!(btf.raw_tracepoint_args("odd"), None);
    }

    fn recorded_offsets(kernel: &str) -> Vec<(String, Option<u32>)> {
        let path = format!(
            "{}/tests/fixtures/{kernel}/sock_common.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| {
                let (member, offset) = line.split_once(' ').unwrap();
                (member.to_owned(), offset.parse().ok())
            })
            .collect()
    }

    #[test]
    fn real_debian_6_1_btf_matches_the_offsets_bpftool_recorded() {
        use std::io::Read as _;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/kernel-6.1/btf-vmlinux.gz"
        );
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
            .read_to_end(&mut raw)
            .unwrap();
        let btf = Btf::parse(&raw).unwrap();
        assert!(btf.type_count() > 50_000, "{} types", btf.type_count());
        let recorded = recorded_offsets("kernel-6.1");
        assert_eq!(recorded.len(), 8);
        for (member, offset) in recorded {
            assert_eq!(
                btf.member_offset("sock_common", &member),
                offset,
                "{member}"
            );
        }
        assert_eq!(
            btf.member("sock_common", "skc_state").unwrap().size,
            Some(1)
        );
        assert_eq!(
            btf.member("sock_common", "skc_v6_daddr").unwrap().size,
            Some(16)
        );
        assert!(
            btf.member("sock_common", "skc_reuse")
                .unwrap()
                .bitfield_bits
                == 4
        );
        // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate) in 6.1.
        assert_eq!(
            btf.raw_tracepoint_args("inet_sock_set_state").unwrap(),
            ["struct sock *", "int", "int"]
        );
        // sock_send_length arrived in 6.4.
        assert_eq!(btf.raw_tracepoint_args("sock_send_length"), None);
        assert_eq!(btf.member_offset("sock", "sk_protocol"), Some(516));
        let lrcvtime = btf
            .member_path("tcp_sock", &["inet_conn", "icsk_ack", "lrcvtime"])
            .unwrap();
        assert_eq!((lrcvtime.bit_offset % 8, lrcvtime.size), (0, Some(4)));
        assert_eq!(
            btf.member_path("tcp_sock", &["lsndtime"]).unwrap().size,
            Some(4)
        );
        assert_eq!(btf.member_path("tcp_sock", &["inet_conn", "nope"]), None);
        assert_eq!(btf.member_path("tcp_sock", &["lsndtime", "deeper"]), None);
    }

    /// Host test: reads this machine's /sys/kernel/btf/vmlinux (needs root on most systems) and,
    /// when the running kernel is the one a fixture was recorded from, checks it matches.
    #[test]
    #[ignore = "host test: needs this host's BTF; cargo xtask test runs it"]
    fn host_btf_matches_recorded_offsets() {
        let raw = std::fs::read("/sys/kernel/btf/vmlinux").expect("/sys/kernel/btf/vmlinux");
        let started = std::time::Instant::now();
        let btf = Btf::parse(&raw).unwrap();
        eprintln!(
            "parsed {} bytes, {} types in {:?}",
            raw.len(),
            btf.type_count(),
            started.elapsed()
        );
        for event in ["sock_send_length", "sock_recv_length"] {
            assert_eq!(
                btf.raw_tracepoint_args(event).unwrap(),
                ["struct sock *", "int", "int"],
                "{event}"
            );
        }
        for member in [
            "skc_daddr",
            "skc_rcv_saddr",
            "skc_dport",
            "skc_num",
            "skc_family",
            "skc_state",
        ] {
            assert!(
                btf.member_offset("sock_common", member).is_some(),
                "{member}"
            );
        }
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        for entry in std::fs::read_dir(fixtures).unwrap() {
            let dir = entry.unwrap().path();
            let recorded_release = std::fs::read_to_string(dir.join("KERNEL")).unwrap_or_default();
            if recorded_release.trim() != release.trim() {
                continue;
            }
            let kernel = dir.file_name().unwrap().to_str().unwrap().to_owned();
            for (member, offset) in recorded_offsets(&kernel) {
                assert_eq!(
                    btf.member_offset("sock_common", &member),
                    offset,
                    "{kernel} {member}"
                );
            }
            return;
        }
        eprintln!(
            "no fixture records kernel {}; only checked that the members exist",
            release.trim()
        );
    }
}
