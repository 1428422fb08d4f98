//! lifeguard's TOML config file, parsed once: the keys that are fine, one message per bad
//! key (with its line), and where each key is written (for messages about its value).

use std::collections::HashMap;
use std::path::Path;

use serde::de::IntoDeserializer;
use serde::Deserialize;
use toml::de::DeTable;
use toml::Spanned;

use super::{ConfigError, FileConfig};

/// One parse of the file's text.
#[derive(Debug, Default)]
pub(super) struct Parsed {
    /// Every key that deserialized.
    pub config: FileConfig,
    /// One message per bad key, in line order (`line N: ...`); a TOML syntax error is the
    /// only message when there is one.
    pub problems: Vec<String>,
    /// The text is not TOML: nothing in it could be read.
    pub syntax_error: bool,
    /// The 1-based line each top-level key is written on.
    lines: HashMap<String, usize>,
    /// The file's bytes as read (what a reload compares a later version with).
    pub bytes: Vec<u8>,
}

impl Parsed {
    pub fn line_of(&self, key: &str) -> Option<usize> {
        self.lines.get(key).copied()
    }
}

/// Parse config file text key by key. A TOML syntax error stops everything: one message,
/// no keys.
pub(super) fn parse(text: &str) -> Parsed {
    let line_at = |pos: usize| text[..pos.min(text.len())].matches('\n').count() + 1;
    let table = match DeTable::parse(text) {
        Ok(t) => t,
        Err(e) => {
            let msg = e.message().trim().to_string();
            let msg = match e.span() {
                Some(sp) => format!("line {}: {msg}", line_at(sp.start)),
                None => msg,
            };
            return Parsed {
                problems: vec![msg],
                syntax_error: true,
                ..Parsed::default()
            };
        }
    };
    let mut parsed = Parsed::default();
    let mut problems: Vec<(usize, String)> = Vec::new();
    for (key, value) in table.into_inner() {
        let name = key.get_ref().to_string();
        let line = line_at(key.span().start);
        parsed.lines.insert(name.clone(), line);
        let mut one = DeTable::new();
        one.insert(key, value);
        match FileConfig::deserialize(Spanned::new(0..0, one).into_deserializer()) {
            Ok(f) => parsed.config.merge(f),
            Err(e) => {
                let msg = e.message().trim().to_string();
                let msg = if msg.contains(&name) {
                    msg
                } else {
                    format!("{name}: {msg}")
                };
                problems.push((line, format!("line {line}: {msg}")));
            }
        }
    }
    problems.sort_by_key(|p| p.0);
    parsed.problems = problems.into_iter().map(|p| p.1).collect();
    parsed
}

/// Read and parse the file; an unreadable file is one problem naming it.
pub(super) fn read(path: &Path) -> Result<Parsed, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: format!("not UTF-8 text: {e}"),
    })?;
    let mut parsed = parse(&text);
    parsed.bytes = text.into_bytes();
    Ok(parsed)
}

/// Read and parse the TOML config file; errors name the file and the line.
pub fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let parsed = read(path)?;
    if parsed.problems.is_empty() {
        return Ok(parsed.config);
    }
    Err(ConfigError::many(
        parsed
            .problems
            .into_iter()
            .map(|message| ConfigError::File {
                path: path.to_path_buf(),
                message,
            })
            .collect(),
    ))
}

/// Parse config file text; the error names the line and the field (every bad key, one
/// per line of the message).
pub fn parse_file_config(text: &str) -> Result<FileConfig, String> {
    let parsed = parse(text);
    if parsed.problems.is_empty() {
        Ok(parsed.config)
    } else {
        Err(parsed.problems.join("\n"))
    }
}
