//! Questions asked of parsed BTF: where a struct member sits (through anonymous struct and
//! union members), a raw tracepoint's argument types, type sizes and names.

use super::{kind, Btf, Detail, MemberLocation, TypeEntry, MAX_DEPTH, VISIT_BUDGET};

impl Btf {
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
