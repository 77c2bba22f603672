//! Parser for tracefs event `format` files
//! (`/sys/kernel/tracing/events/<category>/<event>/format`), which tell where each field of a
//! tracepoint's record sits. The kernel programs read records at these offsets, so they are
//! taken from the running kernel instead of being compiled in.
//!
//! The file looks like:
//! ```text
//! (tabs shown as spaces)
//! name: inet_sock_set_state
//! ID: 2287
//! format:
//!     field:unsigned short common_type;    offset:0;    size:2;    signed:0;
//!     field:const void * skaddr;    offset:8;    size:8;    signed:0;
//!     field:__u8 saddr[4];    offset:32;    size:4;    signed:0;
//!
//! print fmt: "family=%s ...", ...
//! ```
//! Lines this parser does not know are ignored, so later kernels may add to the format freely.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracepointFormat {
    pub name: String,
    pub id: u32,
    /// In file order, including the `common_*` header fields.
    pub fields: Vec<FieldFormat>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldFormat {
    /// Without array brackets: `__u8 saddr[4]` is `saddr`.
    pub name: String,
    /// The declaration without the name, array suffix kept: `__u8[4]`, `const void *`.
    pub c_type: String,
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("line {line}: malformed field: {reason}: {text:?}")]
    MalformedField {
        line: usize,
        reason: &'static str,
        text: String,
    },
    #[error("line {line}: ID is not a number: {text:?}")]
    BadId { line: usize, text: String },
    #[error("line {line}: field {name:?} appears twice")]
    DuplicateField { line: usize, name: String },
    #[error("no `name:` line")]
    MissingName,
    #[error("no `ID:` line")]
    MissingId,
}

impl TracepointFormat {
    pub fn field(&self, name: &str) -> Option<&FieldFormat> {
        self.fields.iter().find(|field| field.name == name)
    }
}

pub fn parse_format(text: &str) -> Result<TracepointFormat, FormatError> {
    let mut name = None;
    let mut id = None;
    let mut fields: Vec<FieldFormat> = Vec::new();
    for (index, raw_line) in text.lines().enumerate() {
        let line_number = index + 1;
        let line = raw_line.trim();
        if let Some(rest) = line.strip_prefix("field:") {
            let field = parse_field(rest).map_err(|reason| FormatError::MalformedField {
                line: line_number,
                reason,
                text: raw_line.to_owned(),
            })?;
            if fields.iter().any(|known| known.name == field.name) {
                return Err(FormatError::DuplicateField {
                    line: line_number,
                    name: field.name,
                });
            }
            fields.push(field);
        } else if let Some(rest) = line.strip_prefix("name:") {
            name = Some(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("ID:") {
            let parsed = rest.trim().parse().map_err(|_| FormatError::BadId {
                line: line_number,
                text: raw_line.to_owned(),
            })?;
            id = Some(parsed);
        } else if line.starts_with("print fmt:") {
            // The print format is the last item and may mention anything, including text that
            // looks like the keys above; nothing after it describes the layout.
            break;
        }
    }
    Ok(TracepointFormat {
        name: name.ok_or(FormatError::MissingName)?,
        id: id.ok_or(FormatError::MissingId)?,
        fields,
    })
}

/// Parses what follows `field:`, e.g. `__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;`.
fn parse_field(rest: &str) -> Result<FieldFormat, &'static str> {
    let mut parts = rest.split(';');
    let declaration = parts.next().unwrap_or_default().trim();
    let (c_type, name) = split_declaration(declaration)?;

    let mut offset = None;
    let mut size = None;
    let mut signed = None;
    for attribute in parts {
        let attribute = attribute.trim();
        if attribute.is_empty() {
            continue;
        }
        let Some((key, value)) = attribute.split_once(':') else {
            return Err("attribute without a colon");
        };
        let value = value.trim();
        match key.trim() {
            "offset" => offset = Some(value.parse::<u32>().map_err(|_| "offset is not a number")?),
            "size" => size = Some(value.parse::<u32>().map_err(|_| "size is not a number")?),
            "signed" => {
                signed = Some(match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err("signed is neither 0 nor 1"),
                })
            }
            // Tolerated so a later kernel can add attributes.
            _ => {}
        }
    }
    Ok(FieldFormat {
        name: name.to_owned(),
        c_type,
        offset: offset.ok_or("no offset")?,
        size: size.ok_or("no size")?,
        // Kernels before 2.6.35 did not print `signed:`; nothing here depends on it.
        signed: signed.unwrap_or(false),
    })
}

/// Splits `const void * skaddr` into (`const void *`, `skaddr`) and `__u8 saddr[4]` into
/// (`__u8[4]`, `saddr`). Dynamic arrays (`__data_loc char[] name`) follow the same rule.
fn split_declaration(declaration: &str) -> Result<(String, &str), &'static str> {
    let (without_array, array_suffix) = match declaration.find('[') {
        Some(bracket) if declaration.ends_with(']') => {
            let (before, suffix) = declaration.split_at(bracket);
            // `char[] name`: the brackets belong to the type, not to the name.
            if before.trim_end().ends_with(is_identifier_char) {
                (before.trim_end(), suffix)
            } else {
                (declaration, "")
            }
        }
        _ => (declaration, ""),
    };
    let name_start = without_array
        .char_indices()
        .rev()
        .find(|&(_, c)| !is_identifier_char(c))
        .map_or(0, |(position, c)| position + c.len_utf8());
    let name = &without_array[name_start..];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("no field name");
    }
    let base_type = without_array[..name_start].trim_end();
    if base_type.is_empty() {
        return Err("no type");
    }
    Ok((format!("{base_type}{array_suffix}"), name))
}

fn is_identifier_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

#[cfg(test)]
mod tests {
    use super::*;

    const INET_SOCK_SET_STATE_6_18: &str =
        include_str!("../../tests/fixtures/kernel-6.18/sock/inet_sock_set_state/format");

    #[test]
    fn parses_inet_sock_set_state_from_6_18() {
        let format = parse_format(INET_SOCK_SET_STATE_6_18).unwrap();
        assert_eq!(format.name, "inet_sock_set_state");
        assert_eq!(format.id, 2287);
        assert_eq!(format.fields.len(), 15);
        assert_eq!(
            format.field("skaddr"),
            Some(&FieldFormat {
                name: "skaddr".into(),
                c_type: "const void *".into(),
                offset: 8,
                size: 8,
                signed: false,
            })
        );
        assert_eq!(
            format.field("saddr_v6"),
            Some(&FieldFormat {
                name: "saddr_v6".into(),
                c_type: "__u8[16]".into(),
                offset: 40,
                size: 16,
                signed: false,
            })
        );
        let oldstate = format.field("oldstate").unwrap();
        assert_eq!(
            (oldstate.c_type.as_str(), oldstate.offset, oldstate.size),
            ("int", 16, 4)
        );
        assert!(oldstate.signed);
        assert_eq!(format.field("common_pid").unwrap().offset, 4);
        assert_eq!(format.field("nonexistent"), None);
    }

    #[test]
    fn parses_every_fixture_file() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut kernels = 0;
        for kernel in std::fs::read_dir(&root).unwrap() {
            let kernel = kernel.unwrap().path();
            let mut parsed = 0;
            for category in ["sock", "tcp", "syscalls"] {
                let Ok(events) = std::fs::read_dir(kernel.join(category)) else {
                    continue;
                };
                for event in events {
                    let event = event.unwrap().path();
                    let text = std::fs::read_to_string(event.join("format")).unwrap();
                    let format = parse_format(&text)
                        .unwrap_or_else(|err| panic!("{}: {err}", event.display()));
                    assert_eq!(format.name, event.file_name().unwrap().to_str().unwrap());
                    assert_eq!(format.field("common_type").unwrap().offset, 0);
                    assert!(format.fields.len() > 4, "{}", event.display());
                    parsed += 1;
                }
            }
            // The fetch script asks every kernel for the same 32 events and lists the absent.
            let absent = std::fs::read_to_string(kernel.join("MISSING")).unwrap();
            assert_eq!(parsed + absent.lines().count(), 32, "{}", kernel.display());
            kernels += 1;
        }
        assert!(kernels >= 3);
    }

    #[test]
    fn syscall_fields_keep_pointer_and_typedef_types() {
        let text = include_str!("../../tests/fixtures/kernel-6.18/syscalls/sys_enter_write/format");
        let format = parse_format(text).unwrap();
        assert_eq!(format.name, "sys_enter_write");
        let buf = format.field("buf").unwrap();
        assert_eq!(
            (buf.c_type.as_str(), buf.offset, buf.size),
            ("const char *", 24, 8)
        );
        let nr = format.field("__syscall_nr").unwrap();
        assert_eq!((nr.offset, nr.size, nr.signed), (8, 4, true));
    }

    #[test]
    fn dynamic_array_brackets_belong_to_the_type() {
        let text = "name: x\nID: 1\nformat:\n\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n";
        let field = parse_format(text).unwrap().fields.remove(0);
        assert_eq!(field.name, "filename");
        assert_eq!(field.c_type, "__data_loc char[]");
    }

    #[test]
    fn tolerates_unknown_lines_and_attributes_and_stops_at_print_fmt() {
        let text = "name: x\nsomething new: 3\nID: 7\nformat:\n\
                    \tfield:int a;\toffset:8;\tsize:4;\tsigned:1;\tcolour:blue;\n\
                    \tfield:long b;\toffset:16;\tsize:8;\n\
                    print fmt: \"field:garbage\", REC->a\n\
                    field:also ignored";
        let format = parse_format(text).unwrap();
        assert_eq!(format.id, 7);
        assert_eq!(format.fields.len(), 2);
        assert!(format.field("a").unwrap().signed);
        assert!(!format.field("b").unwrap().signed);
    }

    #[test]
    fn malformed_lines_give_line_numbers_and_reasons() {
        let cases = [
            (
                "name: x\nID: 1\n\tfield:int a;\toffset:8;\tsigned:1;\n",
                3,
                "no size",
            ),
            (
                "name: x\nID: 1\n\tfield:int a;\toffset:eight;\tsize:4;\n",
                3,
                "offset is not a number",
            ),
            (
                "name: x\nID: 1\n\tfield:int a;\toffset:8;\tsize:-4;\n",
                3,
                "size is not a number",
            ),
            (
                "name: x\nID: 1\n\tfield:int;\toffset:8;\tsize:4;\n",
                3,
                "no type",
            ),
            (
                "name: x\nID: 1\n\tfield: ;\toffset:8;\tsize:4;\n",
                3,
                "no field name",
            ),
            (
                "name: x\n\n\tfield:int a;\toffset 8;\tsize:4;\n",
                3,
                "attribute without a colon",
            ),
            (
                "name: x\nID: 1\n\tfield:int a;\toffset:8;\tsize:4;\tsigned:2;\n",
                3,
                "signed is neither 0 nor 1",
            ),
        ];
        for (text, expected_line, expected_reason) in cases {
            match parse_format(text) {
                Err(FormatError::MalformedField { line, reason, .. }) => {
                    assert_eq!((line, reason), (expected_line, expected_reason), "{text:?}")
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn header_errors() {
        assert_eq!(parse_format("ID: 1\n"), Err(FormatError::MissingName));
        assert_eq!(parse_format("name: x\n"), Err(FormatError::MissingId));
        assert!(matches!(
            parse_format("name: x\nID: twelve\n"),
            Err(FormatError::BadId { line: 2, .. })
        ));
        assert!(matches!(
            parse_format("name: x\nID: 1\n\tfield:int a;\toffset:8;\tsize:4;\n\tfield:int a;\toffset:12;\tsize:4;\n"),
            Err(FormatError::DuplicateField { line: 4, .. })
        ));
        let message = parse_format("name: x\nID: 1\n\tfield:int a;\tsize:4;\n")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("line 3") && message.contains("no offset"),
            "{message}"
        );
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let samples = [
            "",
            "field:",
            "field:[",
            "field:]",
            "field:a[",
            "field:x y[1]];offset:;size:",
            "field:\u{1F600} \u{1F600};offset:1;size:1",
            "name:\nID:\n",
        ];
        for text in samples {
            let _ = parse_format(text);
        }
    }
}
