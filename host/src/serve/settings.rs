//! The ranges of `[serve]`'s connection limits (issue 27), checked when the
//! config is read, so that a value out of range is refused naming its key
//! rather than turned into a service that cuts every client off (a timeout
//! of 1 ms) or never frees anything (a timeout of a day).

use std::time::Duration;

use crate::config::{ConfigProblem, ServeSection};
use crate::limits;

impl ServeSection {
    /// Checks the timeouts and the connection cap against their ranges.
    ///
    /// # Errors
    /// [`ConfigProblem::ServiceLimits`] naming the key, its value and the
    /// range.
    pub fn check_service_limits(&self) -> Result<(), ConfigProblem> {
        let range = limits::SERVE_TIMEOUT_RANGE;
        let millis = |d: &Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        for (key, ms) in [
            ("header_timeout_ms", self.header_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
        ] {
            if !range.contains(&Duration::from_millis(ms)) {
                return Err(ConfigProblem::ServiceLimits {
                    key,
                    value: ms,
                    min: millis(range.start()),
                    max: millis(range.end()),
                });
            }
        }
        let most = limits::SERVE_MAX_CONNECTIONS_CEILING;
        if !(1..=most).contains(&self.max_connections) {
            return Err(ConfigProblem::ServiceLimits {
                key: "max_connections",
                value: self.max_connections as u64,
                min: 1,
                max: most as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    #[test]
    fn out_of_range_connection_limits_are_refused_naming_the_key() {
        for (text, key) in [
            ("[serve]\nheader_timeout_ms = 5\n", "header_timeout_ms"),
            ("[serve]\nbody_timeout_ms = 86400000\n", "body_timeout_ms"),
            ("[serve]\nmax_connections = 0\n", "max_connections"),
            ("[serve]\nmax_connections = 99999999\n", "max_connections"),
        ] {
            let err = Config::parse(text, Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains("out of range"), "{err}");
        }
        let ok = Config::parse(
            "[serve]\nheader_timeout_ms = 2000\nbody_timeout_ms = 5000\nmax_connections = 64\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(ok.serve.max_connections, 64);
        assert!(Config::parse("", Path::new("a.toml")).is_ok());
    }
}
