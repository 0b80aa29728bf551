//! Where a plugin comes from: a file, or bytes built into the binary.

use std::path::PathBuf;

/// Where a plugin comes from.
#[derive(Clone, Debug)]
pub enum PluginSource {
    /// A `.wasm` file.
    File(PathBuf),
    /// A `.wasm` file that must have this sha256 (`[plugin] sha256`):
    /// every load reads it once, and refuses bytes that differ.
    Pinned { path: PathBuf, sha256: String },
    /// Bytes with a name (a built-in plugin).
    Bytes { name: String, bytes: &'static [u8] },
}

/// The plugins built into the binary, by the name a config gives them
/// (`plugin.path = "builtin:NAME"`).
pub const BUILTIN_PLUGINS: &[&str] = &["stub", "bert"];

impl PluginSource {
    /// `builtin:NAME` as that built-in plugin, any other path as a file.
    pub fn from_path(path: &std::path::Path) -> Self {
        path.to_str()
            .and_then(|p| p.strip_prefix("builtin:"))
            .and_then(Self::builtin)
            .unwrap_or_else(|| PluginSource::File(path.to_path_buf()))
    }

    /// The built-in plugin `name` (`stub` or `bert`).
    pub fn builtin(name: &str) -> Option<Self> {
        let bytes = match name {
            "stub" => crate::plugins::STUB_WASM_BYTES,
            "bert" => crate::plugins::BERT_WASM_BYTES,
            _ => return None,
        };
        Some(PluginSource::Bytes {
            name: format!("builtin:{name}"),
            bytes,
        })
    }

    /// The built-in stub plugin.
    pub fn builtin_stub() -> Self {
        PluginSource::Bytes {
            name: "builtin:stub".into(),
            bytes: crate::plugins::STUB_WASM_BYTES,
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> String {
        match self {
            PluginSource::File(p) | PluginSource::Pinned { path: p, .. } => p.display().to_string(),
            PluginSource::Bytes { name, .. } => name.clone(),
        }
    }

    /// The file, for a plugin that is one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            PluginSource::File(p) | PluginSource::Pinned { path: p, .. } => Some(p),
            PluginSource::Bytes { .. } => None,
        }
    }
}
