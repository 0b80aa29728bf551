//! `[[models]]`: more models served beside the configured one, each by a
//! supervised pool of its own (`embedhost serve`).
//!
//! ```toml
//! [[models]]
//! backend = "native"
//! [models.model]
//! id = "paraphrase-minilm-l3-v2"
//! [models.supervisor]
//! pool_size = 1
//! ```
//!
//! # Invariants
//! - An entry sets only what describes an embedder ([`MODEL_KEYS`]): its
//!   `name`, `backend`, `[model]`, `[plugin]`, `[native]`, `[supervisor]`
//!   and `[limits]`. Its `[model]` and `[plugin]` are its own: nothing of the
//!   main config's model, plugin, plugin settings or pin reaches it (an
//!   entry that sets neither serves the default model with the default
//!   plugin). Each key it sets in `[native]`, `[supervisor]` and `[limits]`
//!   overrides the main config's; the rest, `backend`, and every other
//!   section (`[serve]`, `[index]`, `[nats]`, ...) are the main config's.
//! - Each entry becomes a whole [`Config`] that passes every check the main
//!   one passes, through the same code.
//! - Every model served has a name of its own ([`Config::served_name`]): two
//!   alike are refused, naming the name.

use std::path::Path;

use super::{Config, ConfigError, ConfigProblem};

/// The sections an entry never inherits from the main config: a model's
/// files, its plugin and the plugin's settings belong together.
const OWN_SECTIONS: &[&str] = &["model", "plugin"];

/// What an entry of `[[models]]` may set.
pub const MODEL_KEYS: &[&str] = &[
    "name",
    "backend",
    "model",
    "plugin",
    "native",
    "supervisor",
    "limits",
];

impl Config {
    /// The name the service serves this model under: the entry's `name`,
    /// else its `[model] dir`'s directory name, else its model id.
    pub fn served_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        match &self.model.dir {
            Some(dir) => dir.file_name().map_or_else(
                || dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            None => self.model_id().to_string(),
        }
    }

    /// Every model this config serves: itself first (the default model),
    /// then its `[[models]]`.
    pub fn served(&self) -> Vec<&Config> {
        std::iter::once(self).chain(&self.models).collect()
    }

    /// Makes the configs of `entries` (the file's `[[models]]` tables) over
    /// `main` (the file's whole table), read from `path`, into
    /// [`Config::models`], and checks that every name is served once.
    pub(super) fn add_models(
        &mut self,
        main: &toml::Table,
        entries: Vec<toml::Table>,
        path: &Path,
    ) -> Result<(), ConfigError> {
        let problem = |problem| ConfigError::Check {
            path: path.to_path_buf(),
            problem,
        };
        for (index, entry) in entries.into_iter().enumerate() {
            let number = index + 1;
            let name = match entry.get("name") {
                None => None,
                Some(toml::Value::String(name)) if !name.trim().is_empty() => Some(name.clone()),
                Some(_) => return Err(problem(ConfigProblem::ModelName { entry: number })),
            };
            let table = merged(main, entry, number).map_err(problem)?;
            let mut config = Config::from_table(table, path, number)?;
            config.name = name;
            self.models.push(config);
        }
        let mut names: Vec<String> = self.served().iter().map(|c| c.served_name()).collect();
        names.sort();
        if let Some(twice) = names.windows(2).find(|w| w[0].eq_ignore_ascii_case(&w[1])) {
            return Err(problem(ConfigProblem::ServedTwice {
                name: twice[0].clone(),
            }));
        }
        Ok(())
    }

    /// A config from one merged `table` of `[[models]]` entry `number`.
    fn from_table(table: toml::Table, path: &Path, number: usize) -> Result<Config, ConfigError> {
        let text = toml::to_string(&table).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: format!("[[models]] entry {number}: {e}"),
        })?;
        Config::parse_one(&text, path).map_err(|e| match e {
            ConfigError::Invalid { path, message } => ConfigError::Invalid {
                path,
                message: format!("[[models]] entry {number}: {message}"),
            },
            other => other,
        })
    }
}

/// `main` with `entry`'s keys over it: a section's keys one by one, other
/// values whole; `[[models]]` itself dropped.
fn merged(
    main: &toml::Table,
    entry: toml::Table,
    number: usize,
) -> Result<toml::Table, ConfigProblem> {
    let mut table = main.clone();
    table.remove("models");
    for own in OWN_SECTIONS {
        table.remove(*own);
    }
    for (key, value) in entry {
        if !MODEL_KEYS.contains(&key.as_str()) {
            return Err(ConfigProblem::ModelKey { entry: number, key });
        }
        if key == "name" {
            continue;
        }
        match (table.get_mut(&key), value) {
            (Some(toml::Value::Table(section)), toml::Value::Table(keys)) => section.extend(keys),
            (_, value) => {
                table.insert(key, value);
            }
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Backend, Config};

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/e/embedhost.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn an_entry_overrides_the_keys_it_sets_and_keeps_the_rest() {
        let config = parse(
            "backend = \"wasm\"\n[native]\nthreads = 3\n[serve]\nmax_inputs = 7\n\
             [[models]]\nbackend = \"native\"\n[models.model]\nid = \"paraphrase-minilm-l3-v2\"\n\
             [models.native]\nprecision = \"int8\"\n\
             [[models]]\nname = \"mine\"\n[models.model]\ndir = \"m\"\n",
        )
        .unwrap();
        let names: Vec<String> = config.served().iter().map(|c| c.served_name()).collect();
        assert_eq!(
            names,
            ["all-minilm-l6-v2", "paraphrase-minilm-l3-v2", "mine"]
        );
        let l3 = &config.models[0];
        assert_eq!(l3.backend, Backend::Native);
        assert_eq!(l3.native.threads, Some(3), "the main config's key stays");
        assert_eq!(l3.native.precision, crate::config::Precision::Int8);
        assert_eq!(l3.serve.max_inputs, 7);
        assert!(l3.models.is_empty());
        // Relative paths follow the file, as in the main config.
        assert_eq!(
            config.models[1].model.dir.as_deref(),
            Some(Path::new("/etc/e/m"))
        );
    }

    #[test]
    fn an_entry_inherits_nothing_of_the_main_models_model_or_plugin() {
        let config = parse(
            "[model]\ndir = \"/m/e5\"\n[plugin]\npath = \"p.wasm\"\nsha256 = \"%s\"\n             [plugin.config]\npooling = \"cls\"\n             [[models]]\nname = \"l3\"\n[models.model]\nid = \"paraphrase-minilm-l3-v2\"\n"
                .replace("%s", &"a".repeat(64))
                .as_str(),
        )
        .unwrap();
        let l3 = &config.models[0];
        assert_eq!(l3.model.dir, None, "the main model's directory leaked");
        assert_eq!(l3.model_id(), "paraphrase-minilm-l3-v2");
        assert!(l3.plugin.path.is_none() && l3.plugin.sha256.is_none());
        assert!(l3.plugin.config.is_empty(), "{:?}", l3.plugin.config);
        // A directory's model is known by the directory's name, never as
        // the default model.
        assert_eq!(config.model_id(), "e5");
    }

    #[test]
    fn an_entry_is_refused_for_what_it_may_not_set_for_a_bad_value_and_for_a_name_served_twice() {
        for (text, words) in [
            (
                "[[models]]\n[models.serve]\nmax_inputs = 3\n",
                "entry 1 may not set `serve`",
            ),
            (
                "[[models]]\nname = \"x\"\n[models.limits]\nmemory_mb = 0\n",
                "greater than zero",
            ),
            (
                "[[models]]\nname = \"x\"\nbackend = \"gpu\"\n",
                "[[models]] entry 1",
            ),
            ("[[models]]\nname = 3\n", "entry 1: `name`"),
            (
                "[[models]]\n[models.model]\nid = \"all-minilm-l6-v2\"\n",
                "`all-minilm-l6-v2` is served twice",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(words), "{text}: {err}");
        }
    }
}
