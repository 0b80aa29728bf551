//! What a plugin file may cost to load, checked before it is compiled.
//!
//! Compiling is where a small hostile file can hurt: a 478 KB component of
//! 20,000 nested empty components took the compiler to 23 GB. So a file is
//! first walked with wasmtime's own parser (no validation, no allocation
//! beyond the walk's stack) and refused, with one line naming the bound,
//! if it exceeds any of:
//! - its size ([`limits::MAX_PLUGIN_FILE_BYTES`], checked before reading);
//! - the nesting of components and modules
//!   ([`limits::MAX_COMPONENT_NESTING`]);
//! - the number of components and modules ([`limits::MAX_COMPONENT_PARTS`]);
//! - the entries of any one section ([`limits::MAX_SECTION_ENTRIES`]).
//!
//! These bound the container, not what compiling it costs: within them a
//! component of many empty functions, or of nested loops, still costs the
//! compiler gigabytes or minutes (issue 26, finding 1). That cost is bounded
//! by compiling in a child under memory and time limits
//! ([`super::compile`]).

use wasmparser::{Parser, Payload};

use crate::limits;

/// Why a plugin file was refused before compiling.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StructureError {
    /// The file is larger than [`limits::MAX_PLUGIN_FILE_BYTES`].
    #[error(
        "the file is {size} bytes; a plugin may be at most {limit} bytes (limits::MAX_PLUGIN_FILE_BYTES)"
    )]
    TooLarge {
        /// The file's size.
        size: u64,
        /// The bound.
        limit: u64,
    },
    /// Components or modules nest deeper than [`limits::MAX_COMPONENT_NESTING`].
    #[error(
        "components and modules nest deeper than {limit} levels (limits::MAX_COMPONENT_NESTING)"
    )]
    TooDeep {
        /// The bound.
        limit: usize,
    },
    /// More components and modules than [`limits::MAX_COMPONENT_PARTS`].
    #[error("it contains more than {limit} components and modules (limits::MAX_COMPONENT_PARTS)")]
    TooManyParts {
        /// The bound.
        limit: usize,
    },
    /// A section with more entries than [`limits::MAX_SECTION_ENTRIES`].
    #[error(
        "its {section} section has {count} entries; the limit is {limit} (limits::MAX_SECTION_ENTRIES)"
    )]
    SectionTooLarge {
        /// Which kind of section.
        section: &'static str,
        /// Its entries.
        count: u32,
        /// The bound.
        limit: u32,
    },
    /// The binary cannot be parsed.
    #[error("malformed at byte {offset}: {message}")]
    Malformed {
        /// Where the parser stopped.
        offset: usize,
        /// The parser's message.
        message: String,
    },
}

/// Checks the size of a plugin file before it is read.
///
/// # Errors
/// [`StructureError::TooLarge`].
pub fn check_size(size: u64) -> Result<(), StructureError> {
    if size > limits::MAX_PLUGIN_FILE_BYTES {
        return Err(StructureError::TooLarge {
            size,
            limit: limits::MAX_PLUGIN_FILE_BYTES,
        });
    }
    Ok(())
}

/// Walks `bytes` and checks every bound of the module docs.
///
/// # Errors
/// The first bound exceeded, or [`StructureError::Malformed`].
pub fn check(bytes: &[u8]) -> Result<(), StructureError> {
    check_size(bytes.len() as u64)?;
    let mut depth = 0usize;
    let mut parts = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| StructureError::Malformed {
            offset: e.offset(),
            message: e.message().to_string(),
        })?;
        let entries = |section: &'static str, count: u32| {
            if count > limits::MAX_SECTION_ENTRIES {
                Err(StructureError::SectionTooLarge {
                    section,
                    count,
                    limit: limits::MAX_SECTION_ENTRIES,
                })
            } else {
                Ok(())
            }
        };
        match payload {
            Payload::Version { .. } => {
                depth += 1;
                parts += 1;
                if depth > limits::MAX_COMPONENT_NESTING {
                    return Err(StructureError::TooDeep {
                        limit: limits::MAX_COMPONENT_NESTING,
                    });
                }
                if parts > limits::MAX_COMPONENT_PARTS {
                    return Err(StructureError::TooManyParts {
                        limit: limits::MAX_COMPONENT_PARTS,
                    });
                }
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::TypeSection(r) => entries("type", r.count())?,
            Payload::ImportSection(r) => entries("import", r.count())?,
            Payload::FunctionSection(r) => entries("function", r.count())?,
            Payload::TableSection(r) => entries("table", r.count())?,
            Payload::MemorySection(r) => entries("memory", r.count())?,
            Payload::GlobalSection(r) => entries("global", r.count())?,
            Payload::ExportSection(r) => entries("export", r.count())?,
            Payload::ElementSection(r) => entries("element", r.count())?,
            Payload::DataSection(r) => entries("data", r.count())?,
            Payload::CodeSectionStart { count, .. } => entries("code", count)?,
            Payload::InstanceSection(r) => entries("core instance", r.count())?,
            Payload::CoreTypeSection(r) => entries("core type", r.count())?,
            Payload::ComponentInstanceSection(r) => entries("component instance", r.count())?,
            Payload::ComponentAliasSection(r) => entries("alias", r.count())?,
            Payload::ComponentTypeSection(r) => entries("component type", r.count())?,
            Payload::ComponentCanonicalSection(r) => entries("canonical function", r.count())?,
            Payload::ComponentImportSection(r) => entries("component import", r.count())?,
            Payload::ComponentExportSection(r) => entries("component export", r.count())?,
            _ => {}
        }
    }
    Ok(())
}

/// Whether the component `bytes` imports, at its top level, a name that
/// starts with `prefix` (for [`super::encoder::wants_encoder`]: which plugins need
/// an encoder, known before compiling). A file that cannot be parsed
/// imports nothing here; compiling it names its fault.
pub fn imports_name(bytes: &[u8], prefix: &str) -> bool {
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload {
            Ok(Payload::Version { .. }) => depth += 1,
            Ok(Payload::End(_)) => depth = depth.saturating_sub(1),
            Ok(Payload::ComponentImportSection(reader)) if depth == 1 => {
                if reader
                    .into_iter()
                    .flatten()
                    .any(|import| import.name.name.starts_with(prefix))
                {
                    return true;
                }
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component of `levels` nested empty components.
    pub(crate) fn nested(levels: usize) -> Vec<u8> {
        const PREAMBLE: &[u8] = b"\0asm\x0d\0\x01\0";
        let mut inner = PREAMBLE.to_vec();
        for _ in 1..levels {
            let mut outer = PREAMBLE.to_vec();
            outer.push(4); // component section
            let mut n = inner.len();
            loop {
                let byte = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    outer.push(byte);
                    break;
                }
                outer.push(byte | 0x80);
            }
            outer.extend_from_slice(&inner);
            inner = outer;
        }
        inner
    }

    #[test]
    fn nesting_within_the_bound_passes_and_past_it_is_refused() {
        assert_eq!(check(&nested(limits::MAX_COMPONENT_NESTING)), Ok(()));
        assert_eq!(
            check(&nested(limits::MAX_COMPONENT_NESTING + 1)),
            Err(StructureError::TooDeep {
                limit: limits::MAX_COMPONENT_NESTING
            })
        );
    }

    #[test]
    fn size_is_checked_before_reading() {
        assert!(check_size(limits::MAX_PLUGIN_FILE_BYTES).is_ok());
        assert!(matches!(
            check_size(limits::MAX_PLUGIN_FILE_BYTES + 1),
            Err(StructureError::TooLarge { .. })
        ));
    }

    /// `preamble` and one section `id` declaring `count` entries (and
    /// holding none: the count is checked before any entry is read).
    fn declaring(preamble: &[u8], id: u8, count: u32) -> Vec<u8> {
        let mut body = Vec::new();
        let mut n = count;
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                body.push(byte);
                break;
            }
            body.push(byte | 0x80);
        }
        let mut bytes = preamble.to_vec();
        bytes.push(id);
        bytes.push(body.len() as u8);
        bytes.extend(body);
        bytes
    }

    #[test]
    fn a_section_declaring_more_entries_than_the_bound_is_refused_naming_it() {
        const MODULE: &[u8] = b"\0asm\x01\0\0\0";
        const COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";
        let past = limits::MAX_SECTION_ENTRIES + 1;
        for (preamble, id, section) in [
            (MODULE, 1, "type"),
            (MODULE, 6, "global"),
            (COMPONENT, 5, "component instance"),
            (COMPONENT, 11, "component export"),
        ] {
            assert_eq!(
                check(&declaring(preamble, id, past)),
                Err(StructureError::SectionTooLarge {
                    section,
                    count: past,
                    limit: limits::MAX_SECTION_ENTRIES
                })
            );
        }
    }

    #[test]
    fn more_sibling_parts_than_the_bound_are_refused() {
        const PREAMBLE: &[u8] = b"\0asm\x0d\0\x01\0";
        let with = |parts: usize| {
            let mut bytes = PREAMBLE.to_vec();
            for _ in 0..parts {
                bytes.push(4); // component section
                bytes.push(PREAMBLE.len() as u8);
                bytes.extend_from_slice(PREAMBLE);
            }
            bytes
        };
        // The outer component is a part too.
        assert_eq!(check(&with(limits::MAX_COMPONENT_PARTS - 1)), Ok(()));
        assert_eq!(
            check(&with(limits::MAX_COMPONENT_PARTS)),
            Err(StructureError::TooManyParts {
                limit: limits::MAX_COMPONENT_PARTS
            })
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut bytes = nested(3);
        bytes.truncate(bytes.len() - 3);
        assert!(matches!(
            check(&bytes),
            Err(StructureError::Malformed { .. })
        ));
    }
}
