//! The effective settings: lifeguard's own (flags, env, config file) with what NapCat's
//! config file says about the upstream on top. This is their only writer, so a config
//! reload and a NapCat file change never undo each other, and "what changed" is always
//! effective against effective.

use std::sync::Arc;

use crate::config::{Secret, Settings};

/// What NapCat's file says about the upstream, applied over lifeguard's own settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overlay {
    /// The followed server's port.
    pub port: Option<u16>,
    /// The followed server's token (`Some(None)`: NapCat requires none).
    pub token: Option<Option<Secret>>,
}

impl Overlay {
    fn apply(&self, s: &mut Settings) {
        if let (Some(p), Some(up)) = (self.port, s.upstream.as_mut()) {
            up.port = p;
        }
        if let Some(t) = &self.token {
            if !s.upstream_token_explicit {
                s.upstream_token = t.clone();
            }
        }
    }
}

/// Where a settings change came from (it names the cause of the transition it makes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// lifeguard's flags, environment or config file.
    Config,
    /// NapCat's config file.
    Napcat,
}

/// The two layers and their combination.
pub(super) struct Layers {
    base: Settings,
    napcat: Overlay,
    /// The settings the process started with: keys that only change on restart are
    /// pinned to them.
    started_with: Arc<Settings>,
    effective: Arc<Settings>,
}

impl Layers {
    pub fn new(settings: Settings) -> Layers {
        let effective = Arc::new(settings.clone());
        Layers {
            base: settings,
            napcat: Overlay::default(),
            started_with: effective.clone(),
            effective,
        }
    }

    pub fn effective(&self) -> &Arc<Settings> {
        &self.effective
    }

    pub fn napcat(&self) -> &Overlay {
        &self.napcat
    }

    pub fn base(&self) -> &Settings {
        &self.base
    }

    pub fn set_base(&mut self, base: Settings) {
        self.base = base;
        self.recompute();
    }

    pub fn set_napcat(&mut self, overlay: Overlay) {
        self.napcat = overlay;
        self.recompute();
    }

    fn recompute(&mut self) {
        let mut next = self.base.clone();
        self.napcat.apply(&mut next);
        next.listen = self.started_with.listen;
        next.admin_listen = self.started_with.admin_listen;
        next.reverse_listen = self.started_with.reverse_listen;
        next.log_format = self.started_with.log_format;
        next.post_listen = self.started_with.post_listen;
        next.post_url = self.started_with.post_url.clone();
        if next != *self.effective {
            self.effective = Arc::new(next);
        }
    }

    /// Keys that a new base would change but that only take effect on restart.
    pub fn restart_needed(&self) -> Vec<&'static str> {
        self.started_with.restart_changes(&self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunArgs;

    fn settings(extra: impl FnOnce(&mut RunArgs)) -> Settings {
        let mut a = RunArgs {
            upstream: Some("ws://127.0.0.1:3001".into()),
            ..Default::default()
        };
        extra(&mut a);
        Settings::resolve(&a, None).unwrap()
    }

    #[test]
    fn napcat_overlay_survives_reloads_and_changes_are_effective_against_effective() {
        let mut l = Layers::new(settings(|_| {}));
        l.set_napcat(Overlay {
            port: Some(3005),
            token: None,
        });
        let before = l.effective().clone();
        assert_eq!(before.upstream.as_ref().unwrap().port, 3005);
        l.set_base(settings(|a| a.fall = Some(5)));
        let after = l.effective().clone();
        assert_eq!(after.upstream.as_ref().unwrap().port, 3005, "overlay kept");
        assert_eq!(before.live_changes(&after), vec!["fall"]);
    }

    #[test]
    fn restart_only_keys_stay_pinned() {
        let mut l = Layers::new(settings(|_| {}));
        l.set_base(settings(|a| {
            a.listen = Some("127.0.0.1:1".parse().unwrap())
        }));
        assert_eq!(
            l.effective().listen,
            crate::config::DEFAULT_LISTEN.parse().unwrap()
        );
        assert_eq!(l.restart_needed(), vec!["listen"]);
    }

    #[test]
    fn an_explicit_upstream_token_is_not_overridden() {
        let mut l = Layers::new(settings(|a| a.upstream_token = Some("mine".into())));
        l.set_napcat(Overlay {
            port: None,
            token: Some(Some(Secret::new("napcat"))),
        });
        assert_eq!(
            l.effective().upstream_token.as_ref().unwrap().expose(),
            "mine"
        );
    }
}
