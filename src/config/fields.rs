//! The one list of settings: `settings!` turns each entry into a flag (with its
//! `LIFEGUARD_*` variable), a config-file key, a field of [`Settings`](super::Settings) with
//! its default and its validation, a line of `check-config`, and a place in the
//! restart-needed set. A new setting is one new entry here and nothing else.
//!
//! Each entry reads:
//!
//! ```text
//! /// Help text (also the field's doc).
//! key: SettingsType = default, from RawType, via conversion, applied (Live|Restart),
//!     arg(clap attributes), file(serde attributes);
//! ```
//!
//! `RawType` is what the command line, the environment and the file give (every layer is
//! an `Option<RawType>`: `None` means "not given here"); `conversion` is a
//! `fn(RawType) -> Result<SettingsType, String>` that parses and validates, and whose
//! message names the problem (the location is added by the caller).

/// Generates `RunArgs`, `FileConfig`, `Settings` and their per-key helpers from one list.
macro_rules! settings {
    (
        $(
            $(#[doc = $doc:literal])*
            $key:ident : $ty:ty = $default:expr,
                from $raw:ty, via $conv:expr,
                applied $class:ident,
                arg($($arg:tt)*),
                file($($file:tt)*);
        )*
    ) => {
        /// Every setting as given on the command line or in the environment: `None` means
        /// "not given here", and the config file or the default decides.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct RunArgs {
            /// TOML config file; every flag below has a key of the same name (with `_`).
            #[arg(long, env = "LIFEGUARD_CONFIG", value_name = "FILE", global = true)]
            pub config: Option<std::path::PathBuf>,
            $(
                $(#[doc = $doc])*
                #[arg(long, global = true, $($arg)*)]
                pub $key: Option<$raw>,
            )*
        }

        /// The config file: every key optional, unknown keys refused.
        #[derive(Debug, Clone, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct FileConfig {
            $(
                #[serde(default $($file)*)]
                pub $key: Option<$raw>,
            )*
        }

        /// The effective configuration. Immutable; a reload builds a new one.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Settings {
            $(
                $(#[doc = $doc])*
                pub $key: $ty,
            )*
            /// The operator set the upstream token (flag, env or file) rather than letting
            /// it default; NapCat-config following then leaves it alone.
            pub upstream_token_explicit: bool,
        }

        /// Every key, in the order `check-config` prints them, and when a change applies.
        pub const KEYS: &[(&str, Applied)] = &[$((stringify!($key), Applied::$class),)*];

        impl RunArgs {
            /// Whether `key` was given on the command line or in the environment.
            pub fn gives(&self, key: &str) -> bool {
                match key {
                    $(stringify!($key) => self.$key.is_some(),)*
                    _ => false,
                }
            }
        }

        impl FileConfig {
            /// Take every key `other` sets.
            pub fn merge(&mut self, other: FileConfig) {
                $(
                    if other.$key.is_some() {
                        self.$key = other.$key;
                    }
                )*
            }
        }

        impl Settings {
            /// Flag (or env) over file over default, each given value converted and checked.
            /// Problems are reported as (key, given by flag, message); the key's default
            /// stands in for a bad value so that every problem is found in one pass.
            fn layered(
                args: &RunArgs,
                file: &FileConfig,
                problems: &mut Vec<(&'static str, bool, String)>,
            ) -> Settings {
                Settings {
                    $(
                        $key: {
                            let given = match (&args.$key, &file.$key) {
                                (Some(v), _) => Some((v.clone(), true)),
                                (None, Some(v)) => Some((v.clone(), false)),
                                (None, None) => None,
                            };
                            match given {
                                None => $default,
                                Some((raw, by_flag)) => {
                                    let converted: Result<$ty, String> = ($conv)(raw);
                                    converted.unwrap_or_else(|m| {
                                        problems.push((stringify!($key), by_flag, m));
                                        $default
                                    })
                                }
                            }
                        },
                    )*
                    upstream_token_explicit: false,
                }
            }

            /// `(key, value)` for every setting, secrets masked: what `check-config` prints.
            pub fn entries(&self) -> Vec<(&'static str, String)> {
                use $crate::config::values::Render;
                vec![$((stringify!($key), self.$key.render()),)*]
            }

            /// The keys whose value differs (secrets compared, never shown).
            pub fn changed_keys(&self, other: &Settings) -> Vec<&'static str> {
                let mut out = Vec::new();
                $(
                    if self.$key != other.$key {
                        out.push(stringify!($key));
                    }
                )*
                out
            }
        }
    };
}

pub(crate) use settings;
