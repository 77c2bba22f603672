//! Hand-encoded BTF for tests here and in `offsets`.

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

    pub fn composite(&mut self, kind: u8, name: &str, size: u32, flag: bool, members: &[M]) -> u32 {
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
