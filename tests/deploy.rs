//! Keeps the deployment files honest without a container engine.
//!
//! Each way of running lifeguard (the Docker image, the compose stack, the Kubernetes Pod,
//! the systemd unit) is read into the command line and environment lifeguard would actually
//! get there. Static checks compare ports, probe paths and timeouts with the binary's
//! defaults; the CLI checks run the real binary (`lifeguard check-config`, and the image's
//! HEALTHCHECK command against a fake admin listener) with exactly that environment and
//! nothing else (`env_clear`), so a typo in a variable name or a bad value fails here rather
//! than in production.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::CommandFactory;
use lifeguard::config::{
    parse_duration, Cli, DEFAULT_ADMIN_LISTEN, DEFAULT_DRAIN_TIMEOUT, DEFAULT_LISTEN, EXIT_USAGE,
};
use serde_yaml_ng::Value;

/// The admin listener's probe paths (the contract in `src/config.rs` and the issue text;
/// there is no constant for them in the library).
const LIVE_PATH: &str = "/live";
const READY_PATH: &str = "/ready";
/// NapCat's default forward WebSocket port: never published, never behind the Service.
const NAPCAT_WS_PORT: u16 = 3001;
const BINARY_IN_IMAGE: &str = "/usr/local/bin/lifeguard";

type Env = BTreeMap<String, String>;

// ---------------------------------------------------------------------------------------
// Files

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yml" | "yaml")
        ) {
            out.push(path);
        }
    }
}

fn port_of(addr: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?}: {e}"))
        .port()
}

fn seconds(s: &str) -> Duration {
    let s = s.trim();
    // systemd and Kubernetes take a bare number as seconds; humantime wants a unit.
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        Duration::from_secs(s.parse().unwrap())
    } else {
        parse_duration(s).unwrap()
    }
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(|s| s.as_slice()).unwrap_or(&[])
}

/// Every `LIFEGUARD_*` variable the binary reads, from its own clap definition.
fn known_env_vars() -> Vec<String> {
    let cmd = Cli::command();
    let mut vars: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    for sub in cmd.get_subcommands() {
        vars.extend(
            sub.get_arguments()
                .filter_map(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned()),
        );
    }
    vars
}

fn assert_known_env(what: &str, env: &Env) {
    let known = known_env_vars();
    for key in env.keys().filter(|k| k.starts_with("LIFEGUARD_")) {
        assert!(
            known.contains(key),
            "{what}: {key} is not a variable lifeguard reads (known: {known:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// One way of running lifeguard: its arguments and its environment.

#[derive(Debug, Clone)]
struct Launch {
    what: String,
    args: Vec<String>,
    env: Env,
}

impl Launch {
    /// Flag first, then environment variable: clap's precedence.
    fn setting(&self, flag: &str, var: &str) -> Option<String> {
        let long = format!("--{flag}");
        let prefixed = format!("--{flag}=");
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if *a == long {
                return it.next().cloned();
            }
            if let Some(v) = a.strip_prefix(&prefixed) {
                return Some(v.to_string());
            }
        }
        self.env.get(var).cloned()
    }

    fn listen(&self) -> SocketAddr {
        self.setting("listen", "LIFEGUARD_LISTEN")
            .unwrap_or_else(|| DEFAULT_LISTEN.into())
            .parse()
            .unwrap()
    }

    fn admin_listen(&self) -> SocketAddr {
        self.setting("admin-listen", "LIFEGUARD_ADMIN_LISTEN")
            .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.into())
            .parse()
            .unwrap()
    }

    fn drain_timeout(&self) -> Duration {
        self.setting("drain-timeout", "LIFEGUARD_DRAIN_TIMEOUT")
            .map(|d| parse_duration(&d).unwrap())
            .unwrap_or(DEFAULT_DRAIN_TIMEOUT)
    }

    fn napcat_config(&self) -> Option<String> {
        self.setting("napcat-config", "LIFEGUARD_NAPCAT_CONFIG")
    }

    /// Paths that exist only inside a container or on a NapCat host (NapCat's config
    /// directory, a config file) are replaced by temporary stand-ins, so that the binary
    /// can be run here; everything else stays exactly as written.
    fn localized(&self, tmp: &TempDir) -> Launch {
        let napcat_dir = tmp.napcat_config_dir();
        let config_file = tmp.config_file();
        let swap = |flag_or_var: &str| -> Option<String> {
            match flag_or_var {
                "napcat-config" | "LIFEGUARD_NAPCAT_CONFIG" => Some(napcat_dir.clone()),
                "config" | "LIFEGUARD_CONFIG" => Some(config_file.clone()),
                _ => None,
            }
        };
        let mut args = Vec::new();
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if let Some(flag) = a.strip_prefix("--") {
                if let Some((f, _)) = flag.split_once('=') {
                    match swap(f) {
                        Some(new) => args.push(format!("--{f}={new}")),
                        None => args.push(a.clone()),
                    }
                    continue;
                }
                if let Some(new) = swap(flag) {
                    args.push(a.clone());
                    it.next();
                    args.push(new);
                    continue;
                }
            }
            args.push(a.clone());
        }
        let env = self
            .env
            .iter()
            .map(|(k, v)| (k.clone(), swap(k).unwrap_or_else(|| v.clone())))
            .collect();
        Launch {
            what: self.what.clone(),
            args,
            env,
        }
    }
}

static TMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "lifeguard-deploy-test-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A NapCat config directory as the Docker image has it: one account, WebSocket server on.
    fn napcat_config_dir(&self) -> String {
        let dir = self.0.join("napcat-config");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("onebot11_10001000.json"),
            r#"{"network":{"httpServers":[],"httpSseServers":[],"httpClients":[],
  "websocketServers":[{"enable":true,"name":"ws","host":"0.0.0.0","port":3001,
    "reportSelfMessage":false,"enableForcePushEvent":true,"messagePostFormat":"array",
    "token":"","debug":false,"heartInterval":30000}],
  "websocketClients":[],"plugins":[]},
 "musicSignUrl":"","enableLocalFile2Url":false,"parseMultMsg":false}
"#,
        )
        .unwrap();
        dir.display().to_string()
    }

    /// An empty lifeguard config file: every key is optional.
    fn config_file(&self) -> String {
        let file = self.0.join("lifeguard.toml");
        fs::write(&file, "# every key optional\n").unwrap();
        file.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// docker/Dockerfile

#[derive(Debug, Default)]
struct Dockerfile {
    /// Base image of the final (runtime) stage.
    runtime_from: String,
    /// ENV of the final stage, in order.
    env: Env,
    expose: Vec<u16>,
    user: Option<String>,
    stopsignal: Option<String>,
    /// HEALTHCHECK options (`--interval=10s`, ...) and its command in exec form.
    healthcheck_options: Vec<String>,
    healthcheck: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    /// Every RUN of every stage, in order.
    runs: Vec<String>,
}

fn exec_form(s: &str, what: &str) -> Vec<String> {
    serde_json::from_str::<Vec<String>>(s.trim())
        .unwrap_or_else(|e| panic!("{what} must be in exec form (a JSON array), got {s:?}: {e}"))
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2
        && ((s.starts_with('"') && s.ends_with('"')) || (s.starts_with('\'') && s.ends_with('\'')))
    {
        s[1..s.len() - 1].to_string()
    } else {
        s.to_string()
    }
}

impl Dockerfile {
    fn parse(text: &str) -> Dockerfile {
        // Join continuation lines; comment lines vanish, also inside a continuation.
        let mut instructions = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
                continue;
            }
            if let Some(body) = trimmed.strip_suffix('\\') {
                current.push_str(body);
                current.push(' ');
            } else {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
        let mut d = Dockerfile::default();
        for ins in instructions {
            let (word, rest) = ins.split_once(char::is_whitespace).unwrap_or((&ins, ""));
            let rest = rest.trim();
            match word.to_ascii_uppercase().as_str() {
                "FROM" => {
                    // A new stage: only the last one's settings reach the image.
                    let runs = std::mem::take(&mut d.runs);
                    d = Dockerfile {
                        runtime_from: rest.split_whitespace().next().unwrap().to_string(),
                        runs,
                        ..Dockerfile::default()
                    };
                }
                "ENV" => {
                    let first = rest.split_whitespace().next().unwrap_or("");
                    if first.contains('=') {
                        for pair in rest.split_whitespace() {
                            let (k, v) = pair.split_once('=').expect("ENV key=value");
                            d.env.insert(k.to_string(), unquote(v));
                        }
                    } else {
                        let (k, v) = rest.split_once(char::is_whitespace).expect("ENV key value");
                        d.env.insert(k.to_string(), unquote(v));
                    }
                }
                "EXPOSE" => d.expose.extend(rest.split_whitespace().map(|p| {
                    p.split('/')
                        .next()
                        .unwrap()
                        .parse::<u16>()
                        .expect("EXPOSE port")
                })),
                "USER" => d.user = Some(rest.to_string()),
                "STOPSIGNAL" => d.stopsignal = Some(rest.to_string()),
                "HEALTHCHECK" => {
                    let (options, cmd) = rest
                        .split_once("CMD")
                        .expect("HEALTHCHECK needs a CMD (not NONE)");
                    d.healthcheck_options =
                        options.split_whitespace().map(str::to_string).collect();
                    d.healthcheck = Some(exec_form(cmd, "HEALTHCHECK CMD"));
                }
                "ENTRYPOINT" => d.entrypoint = Some(exec_form(rest, "ENTRYPOINT")),
                "CMD" => d.cmd = Some(exec_form(rest, "CMD")),
                "RUN" => d.runs.push(rest.to_string()),
                _ => {}
            }
        }
        d
    }

    fn load() -> Dockerfile {
        Dockerfile::parse(&read("docker/Dockerfile"))
    }

    /// `docker run -e LIFEGUARD_UPSTREAM=... lifeguard`: the image's own environment plus
    /// the one setting it cannot have.
    fn docker_run(&self) -> Launch {
        let mut env = self.env.clone();
        env.insert("LIFEGUARD_UPSTREAM".into(), "ws://napcat:3001".into());
        Launch {
            what: "docker run (image ENV + LIFEGUARD_UPSTREAM)".into(),
            args: self.cmd.clone().unwrap_or_default(),
            env,
        }
    }
}

// ---------------------------------------------------------------------------------------
// deploy/docker-compose.yml

/// Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`,
/// `$VAR` and `$$`. An unset or empty required variable is an error, as in compose.
fn interpolate(s: &str, vars: &Env) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
            let expr = &r[..end];
            rest = &r[end + 1..];
            assert!(!expr.contains('$'), "nested interpolation in {s:?}");
            let name_end = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_end);
            let value = vars.get(name).filter(|v| !v.is_empty());
            let set = vars.contains_key(name);
            let v = match op {
                "" => value.cloned().unwrap_or_default(),
                _ if op.starts_with(":-") => value.cloned().unwrap_or_else(|| op[2..].into()),
                _ if op.starts_with('-') => {
                    if set {
                        vars[name].clone()
                    } else {
                        op[1..].into()
                    }
                }
                _ if op.starts_with(":?") => value
                    .cloned()
                    .ok_or_else(|| format!("{name}: {}", &op[2..]))?,
                _ if op.starts_with('?') => {
                    if set {
                        vars[name].clone()
                    } else {
                        return Err(format!("{name}: {}", &op[1..]));
                    }
                }
                _ => return Err(format!("unsupported interpolation ${{{expr}}}")),
            };
            out.push_str(&v);
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push_str(vars.get(&rest[..end]).map(String::as_str).unwrap_or(""));
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `KEY=value` lines of an env file (compose's `.env`, systemd's EnvironmentFile).
/// `commented` also takes `#KEY=value` lines: documented optional settings.
fn env_file(text: &str, commented: bool) -> Env {
    let mut env = Env::new();
    for line in text.lines() {
        let line = line.trim();
        let line = match line.strip_prefix('#') {
            Some(c) if commented => c.trim_start(),
            Some(_) => continue,
            None => line,
        };
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.is_empty()
            || !k
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            continue; // prose in a comment
        }
        env.insert(k.to_string(), v.to_string());
    }
    env
}

struct Compose {
    doc: Value,
    /// Variables of `deploy/.env.example`.
    vars: Env,
}

#[derive(Debug)]
struct PortMapping {
    host_ip: Option<String>,
    published: Option<String>,
    /// Container port or range, as written (`3001`, `3000-3005`).
    target: String,
}

impl PortMapping {
    fn covers(&self, port: u16) -> bool {
        match self.target.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).contains(&port),
            None => self.target.parse::<u16>().unwrap() == port,
        }
    }
    fn host_is_loopback(&self) -> bool {
        matches!(self.host_ip.as_deref(), Some("127.0.0.1" | "::1" | "[::1]"))
    }
}

#[derive(Debug)]
struct Mount {
    source: String,
    target: String,
    read_only: bool,
}

impl Compose {
    fn load() -> Compose {
        Compose {
            doc: yaml("deploy/docker-compose.yml"),
            vars: env_file(&read("deploy/.env.example"), false),
        }
    }

    fn service(&self, name: &str) -> &Value {
        let s = &self.doc["services"][name];
        assert!(s.is_mapping(), "compose: no service {name:?}");
        s
    }

    fn environment(&self, service: &str, vars: &Env) -> Result<Env, String> {
        let mut env = Env::new();
        match &self.service(service)["environment"] {
            Value::Mapping(m) => {
                for (k, v) in m {
                    env.insert(str_of(k), interpolate(&str_of(v), vars)?);
                }
            }
            Value::Sequence(items) => {
                for item in items {
                    let item = str_of(item);
                    let (k, v) = item.split_once('=').unwrap_or((&item, ""));
                    env.insert(k.to_string(), interpolate(v, vars)?);
                }
            }
            Value::Null => {}
            other => panic!("compose {service}.environment: {other:?}"),
        }
        Ok(env)
    }

    fn ports(&self, service: &str) -> Vec<PortMapping> {
        seq(&self.service(service)["ports"])
            .iter()
            .map(|p| match p {
                Value::Mapping(_) => PortMapping {
                    host_ip: p.get("host_ip").map(str_of),
                    published: p.get("published").map(str_of),
                    target: str_of(&p["target"]),
                },
                short => {
                    let s = str_of(short);
                    let s = s.split('/').next().unwrap();
                    let (front, target) = match s.rsplit_once(':') {
                        Some((f, t)) => (Some(f), t),
                        None => (None, s),
                    };
                    let (host_ip, published) = match front.map(|f| f.rsplit_once(':')) {
                        Some(Some((ip, p))) => (Some(ip.to_string()), Some(p.to_string())),
                        Some(None) => (None, front.map(str::to_string)),
                        None => (None, None),
                    };
                    PortMapping {
                        host_ip,
                        published,
                        target: target.to_string(),
                    }
                }
            })
            .collect()
    }

    fn mounts(&self, service: &str) -> Vec<Mount> {
        seq(&self.service(service)["volumes"])
            .iter()
            .map(|v| match v {
                Value::Mapping(_) => Mount {
                    source: v.get("source").map(str_of).unwrap_or_default(),
                    target: str_of(&v["target"]),
                    read_only: v.get("read_only").and_then(Value::as_bool).unwrap_or(false),
                },
                short => {
                    let s = str_of(short);
                    let parts: Vec<&str> = s.split(':').collect();
                    Mount {
                        source: parts[0].to_string(),
                        target: parts.get(1).unwrap_or(&parts[0]).to_string(),
                        read_only: parts
                            .get(2)
                            .is_some_and(|m| m.split(',').any(|o| o == "ro")),
                    }
                }
            })
            .collect()
    }

    fn command(&self, service: &str) -> Vec<String> {
        match &self.service(service)["command"] {
            Value::Null => Vec::new(),
            Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
            Value::Sequence(items) => items.iter().map(str_of).collect(),
            other => panic!("compose {service}.command: {other:?}"),
        }
    }

    /// The variables as an operator fills them in: the example leaves the token blank on
    /// purpose (compose refuses to start until it is set), so the test sets it.
    fn filled_vars(&self) -> Env {
        let mut vars = self.vars.clone();
        vars.insert("ONEBOT_TOKEN".into(), "compose-test-token".into());
        vars.insert("ADMIN_TOKEN".into(), "compose-admin-token".into());
        vars
    }

    /// lifeguard's process in the stack: the image's ENV overlaid by the service's.
    fn lifeguard(&self, image: &Dockerfile) -> Launch {
        let mut env = image.env.clone();
        env.extend(
            self.environment("lifeguard", &self.filled_vars())
                .unwrap_or_else(|e| panic!("compose lifeguard.environment: {e}")),
        );
        Launch {
            what: "deploy/docker-compose.yml, service lifeguard".into(),
            args: self.command("lifeguard"),
            env,
        }
    }
}

// ---------------------------------------------------------------------------------------
// deploy/kubernetes

struct Kube {
    deployment: Value,
    service: Value,
    kustomization: Value,
    secret: Value,
}

impl Kube {
    fn load() -> Kube {
        Kube {
            deployment: yaml("deploy/kubernetes/deployment.yaml"),
            service: yaml("deploy/kubernetes/service.yaml"),
            kustomization: yaml("deploy/kubernetes/kustomization.yaml"),
            secret: yaml("deploy/kubernetes/secret.example.yaml"),
        }
    }

    fn pod(&self) -> &Value {
        &self.deployment["spec"]["template"]["spec"]
    }

    fn container(&self, name: &str) -> &Value {
        seq(&self.pod()["containers"])
            .iter()
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("deployment: no container {name:?}"))
    }

    /// A container port given by number or by name.
    fn resolve_port(container: &Value, port: &Value) -> u16 {
        match port {
            Value::Number(n) => n.as_u64().unwrap() as u16,
            Value::String(name) => seq(&container["ports"])
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("no container port named {name:?}"))["containerPort"]
                .as_u64()
                .unwrap() as u16,
            other => panic!("port {other:?}"),
        }
    }

    fn container_ports(container: &Value) -> Vec<u16> {
        seq(&container["ports"])
            .iter()
            .map(|p| p["containerPort"].as_u64().unwrap() as u16)
            .collect()
    }

    /// lifeguard's process in the Pod: the image's ENV overlaid by the container's; a value
    /// from a Secret becomes a stand-in token.
    fn lifeguard(&self, image: &Dockerfile) -> Launch {
        let c = self.container("lifeguard");
        assert!(
            c["command"].is_null(),
            "deployment: lifeguard must keep the image's ENTRYPOINT (no `command`)"
        );
        let mut env = image.env.clone();
        for e in seq(&c["env"]) {
            let name = str_of(&e["name"]);
            let value = if e["valueFrom"].is_mapping() {
                let r = &e["valueFrom"]["secretKeyRef"];
                assert!(r.is_mapping(), "deployment env {name}: only secretKeyRef");
                format!("secret-{}-{}", str_of(&r["name"]), str_of(&r["key"]))
            } else {
                str_of(&e["value"])
            };
            env.insert(name, value);
        }
        Launch {
            what: "deploy/kubernetes/deployment.yaml, container lifeguard".into(),
            args: seq(&c["args"]).iter().map(str_of).collect(),
            env,
        }
    }
}

// ---------------------------------------------------------------------------------------
// deploy/systemd

struct Unit {
    /// `[Section]` -> key -> values in order (a key may repeat).
    sections: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

impl Unit {
    fn load() -> Unit {
        let text = read("deploy/systemd/lifeguard.service");
        let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        let mut section = String::new();
        let mut pending = String::new();
        for line in text.lines() {
            let line = line.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if let Some(body) = line.strip_suffix('\\') {
                pending.push_str(body);
                pending.push(' ');
                continue;
            }
            let full = std::mem::take(&mut pending) + line;
            if full.starts_with('[') {
                section = full.trim_matches(['[', ']']).to_string();
            } else {
                let (k, v) = full
                    .split_once('=')
                    .unwrap_or_else(|| panic!("unit: bad line {full:?}"));
                sections
                    .entry(section.clone())
                    .or_default()
                    .entry(k.trim().to_string())
                    .or_default()
                    .push(v.trim().to_string());
            }
        }
        Unit { sections }
    }

    fn service(&self, key: &str) -> Vec<String> {
        self.sections
            .get("Service")
            .and_then(|s| s.get(key))
            .cloned()
            .unwrap_or_default()
    }

    fn one(&self, key: &str) -> String {
        let v = self.service(key);
        assert_eq!(v.len(), 1, "unit: expected one {key}=, got {v:?}");
        v[0].clone()
    }

    fn exec_start(&self) -> Vec<String> {
        self.one("ExecStart")
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// lifeguard under systemd: ExecStart's arguments and the example environment file
    /// (with its commented optional settings too, when `optional`).
    fn lifeguard(&self, optional: bool) -> Launch {
        let exec = self.exec_start();
        Launch {
            what: format!(
                "deploy/systemd/lifeguard.service + lifeguard.env.example{}",
                if optional {
                    " (optional settings on)"
                } else {
                    ""
                }
            ),
            args: exec[1..].to_vec(),
            env: env_file(&read("deploy/systemd/lifeguard.env.example"), optional),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running the real binary

const BIN: &str = env!("CARGO_BIN_EXE_lifeguard");

/// Run lifeguard with these arguments and exactly this environment; never hang a test.
fn run(args: &[String], env: &Env) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lifeguard");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lifeguard {args:?} did not exit within 30s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `lifeguard check-config <args>` must accept this launch, and print what we computed.
fn assert_check_config_accepts(launch: &Launch) {
    let tmp = TempDir::new();
    let local = launch.localized(&tmp);
    let mut args = vec!["check-config".to_string()];
    args.extend(local.args.iter().cloned());
    let out = run(&args, &local.env);
    assert!(
        out.status.success(),
        "{}: `lifeguard {}` refused it:\n{}",
        launch.what,
        args.join(" "),
        describe(&out)
    );
    // The effective settings, `key = value` a line (Settings::render).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed: BTreeMap<&str, &str> = stdout
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let expect = [
        ("listen", local.listen().to_string()),
        ("admin_listen", local.admin_listen().to_string()),
        (
            "drain_timeout",
            humantime::format_duration(local.drain_timeout()).to_string(),
        ),
    ];
    for (key, want) in expect {
        assert_eq!(
            printed.get(key).copied(),
            Some(want.as_str()),
            "{}: check-config's effective {key} differs from what this test read:\n{}",
            launch.what,
            describe(&out)
        );
    }
    for secret in local.env.iter().filter(|(k, _)| k.ends_with("TOKEN")) {
        assert!(
            !stdout.contains(secret.1.as_str()),
            "{}: check-config printed {}",
            launch.what,
            secret.0
        );
    }
}

/// A one-shot admin listener: answers the first request with `status` and reports the
/// request line.
fn fake_admin(status: &'static str) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut sock, _)) = listener.accept() else {
            return;
        };
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head = String::from_utf8_lossy(&buf);
        let _ = tx.send(head.lines().next().unwrap_or("").to_string());
        let _ = write!(
            sock,
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
    });
    (port, rx)
}

/// The image's HEALTHCHECK command as Docker runs it in the compose stack: same
/// environment as lifeguard's main process (not its command line), the admin address
/// moved to a port of our own.
fn healthcheck_launch(extra_args: &[&str], admin_port: u16) -> (Vec<String>, Env) {
    let image = Dockerfile::load();
    let health = image.healthcheck.clone().expect("HEALTHCHECK");
    let tmp = TempDir::new();
    let mut env = Compose::load().lifeguard(&image).localized(&tmp).env;
    env.insert(
        "LIFEGUARD_ADMIN_LISTEN".into(),
        format!("0.0.0.0:{admin_port}"),
    );
    let mut args: Vec<String> = health[1..].to_vec();
    args.extend(extra_args.iter().map(|s| s.to_string()));
    (args, env)
}

// =======================================================================================
// Static checks: these need no working CLI.

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = Vec::new();
    yaml_files(&root().join("deploy"), &mut files);
    assert!(
        files.len() >= 6,
        "expected the compose file and the Kubernetes manifests, found {files:?}"
    );
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let mut docs = 0;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(
                v.is_mapping(),
                "{}: a document is not a mapping",
                file.display()
            );
            if file.parent().unwrap().ends_with("kubernetes") {
                assert!(
                    v["apiVersion"].is_string() && v["kind"].is_string(),
                    "{}: a manifest without apiVersion/kind",
                    file.display()
                );
            }
            docs += 1;
        }
        assert!(docs >= 1, "{}: empty", file.display());
    }
}

#[test]
fn every_lifeguard_variable_in_the_deploy_files_is_one_the_binary_reads() {
    let image = Dockerfile::load();
    assert_known_env("docker/Dockerfile ENV", &image.env);
    let compose = Compose::load();
    assert_known_env("compose lifeguard", &compose.lifeguard(&image).env);
    assert_known_env("kubernetes lifeguard", &Kube::load().lifeguard(&image).env);
    assert_known_env("systemd env example", &Unit::load().lifeguard(true).env);
}

#[test]
fn dockerfile_runtime_image_matches_the_binary() {
    let d = Dockerfile::load();
    let listen_port = port_of(DEFAULT_LISTEN);
    let admin_port = port_of(DEFAULT_ADMIN_LISTEN);

    assert!(
        d.runtime_from.starts_with("gcr.io/distroless/") || d.runtime_from.contains("-slim"),
        "runtime image {:?}: distroless or debian-slim",
        d.runtime_from
    );
    let user = d.user.as_deref().expect("USER in the runtime stage");
    let uid = user.split(':').next().unwrap();
    assert!(!matches!(uid, "root" | "0" | ""), "USER {user}: not root");
    assert!(
        uid.chars().all(|c| c.is_ascii_digit()),
        "USER {user}: numeric, so that Kubernetes' runAsNonRoot can check it"
    );

    // Settings by environment; reachable from outside the container.
    let run = d.docker_run();
    assert_eq!(run.listen().port(), listen_port);
    assert_eq!(run.admin_listen().port(), admin_port);
    assert!(
        run.listen().ip().is_unspecified(),
        "LIFEGUARD_LISTEN must bind all interfaces"
    );
    assert!(
        run.admin_listen().ip().is_unspecified(),
        "LIFEGUARD_ADMIN_LISTEN must bind all interfaces, for probes from outside the container"
    );
    assert!(
        d.expose.contains(&listen_port),
        "EXPOSE {listen_port}: {:?}",
        d.expose
    );
    assert!(
        d.expose.contains(&admin_port),
        "EXPOSE {admin_port}: {:?}",
        d.expose
    );

    assert_eq!(
        d.entrypoint.as_deref(),
        Some(&[BINARY_IN_IMAGE.to_string()][..])
    );
    let health = d.healthcheck.as_ref().unwrap();
    assert_eq!(
        health[0], BINARY_IN_IMAGE,
        "HEALTHCHECK runs the binary itself, no shell"
    );
    assert_eq!(health[1], "health");
    assert_eq!(d.stopsignal.as_deref(), Some("SIGTERM"));

    // The dependency layer: dependencies are built before the sources are copied in.
    let cook = d.runs.iter().position(|r| r.contains("cargo chef cook"));
    let build = d.runs.iter().position(|r| r.contains("cargo build"));
    assert!(
        matches!((cook, build), (Some(c), Some(b)) if c < b),
        "builder: a cached dependency layer (cargo chef cook) before cargo build: {:?}",
        d.runs
    );
    assert!(
        d.runs.iter().any(|r| r.contains("--locked")),
        "builder: build with --locked"
    );
}

#[test]
fn dockerignore_keeps_target_and_git_out_and_the_sources_in() {
    let text = read(".dockerignore");
    let patterns: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["target/", ".git/"] {
        assert!(patterns.contains(&must), ".dockerignore: {must} missing");
    }
    for keep in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "benches",
        "tests",
        "examples",
    ] {
        assert!(
            !patterns
                .iter()
                .any(|p| p.trim_end_matches('/').trim_start_matches('/') == keep),
            ".dockerignore must not exclude {keep}: the build needs it"
        );
    }
}

#[test]
fn compose_publishes_lifeguard_and_hides_napcat() {
    let c = Compose::load();
    let image = Dockerfile::load();
    let lg = c.lifeguard(&image);

    let napcat = c.service("napcat");
    assert!(str_of(&napcat["image"]).starts_with("mlikiowa/napcat-docker"));
    assert_ne!(
        napcat["network_mode"].as_str(),
        Some("host"),
        "napcat on the host network publishes 3001"
    );
    for p in c.ports("napcat") {
        assert!(
            !p.covers(NAPCAT_WS_PORT),
            "napcat publishes its WebSocket port: {p:?}"
        );
        assert!(
            p.host_is_loopback(),
            "napcat publishes {p:?} beyond loopback"
        );
    }

    let lg_ports = c.ports("lifeguard");
    assert!(
        lg_ports
            .iter()
            .any(|p| p.covers(lg.listen().port()) && p.published.is_some()),
        "lifeguard's client port {} is not published: {lg_ports:?}",
        lg.listen().port()
    );
    assert_eq!(lg.listen().port(), port_of(DEFAULT_LISTEN));
    for p in lg_ports
        .iter()
        .filter(|p| p.covers(lg.admin_listen().port()))
    {
        assert!(
            p.host_is_loopback(),
            "the admin port is published beyond loopback: {p:?}"
        );
    }

    // Upstream: NapCat by its service name, on the port it keeps to the compose network.
    let upstream = lg
        .setting("upstream", "LIFEGUARD_UPSTREAM")
        .expect("upstream");
    assert_eq!(upstream, format!("ws://napcat:{NAPCAT_WS_PORT}"));

    // The image: docker/Dockerfile with the repository root as context.
    let build = &c.service("lifeguard")["build"];
    let context = root().join("deploy").join(str_of(&build["context"]));
    assert_eq!(
        context.canonicalize().unwrap(),
        root().canonicalize().unwrap()
    );
    assert_eq!(str_of(&build["dockerfile"]), "docker/Dockerfile");
    assert!(context.join(str_of(&build["dockerfile"])).is_file());
    assert!(
        c.service("lifeguard")["entrypoint"].is_null(),
        "keep the image's ENTRYPOINT"
    );
    // The HEALTHCHECK process sees the environment, not the command line.
    assert!(
        lg.args.iter().all(|a| !a.starts_with("--admin-listen")),
        "set the admin address in `environment`, or the HEALTHCHECK asks the wrong port"
    );

    let grace = seconds(&str_of(&c.service("lifeguard")["stop_grace_period"]));
    assert!(
        grace > lg.drain_timeout(),
        "stop_grace_period {grace:?} must exceed the drain timeout {:?}",
        lg.drain_timeout()
    );

    // The example bot (commented out) points at lifeguard's client port.
    assert!(read("deploy/docker-compose.yml")
        .contains(&format!("ws://lifeguard:{}", port_of(DEFAULT_LISTEN))));
}

#[test]
fn compose_shares_napcat_config_read_only() {
    let c = Compose::load();
    let lg = c.lifeguard(&Dockerfile::load());
    let napcat_mount = c
        .mounts("napcat")
        .into_iter()
        .find(|m| m.target == "/app/napcat/config")
        .expect("napcat's config volume /app/napcat/config");
    let watched = lg
        .napcat_config()
        .expect("lifeguard follows NapCat's config");
    let shared = c
        .mounts("lifeguard")
        .into_iter()
        .find(|m| m.target == watched)
        .unwrap_or_else(|| panic!("lifeguard watches {watched}, which is not mounted"));
    assert_eq!(
        shared.source, napcat_mount.source,
        "the same volume as NapCat's config"
    );
    assert!(
        shared.read_only,
        "lifeguard mounts NapCat's config read-only"
    );
}

#[test]
fn compose_tokens_come_from_variables() {
    let c = Compose::load();
    let text = read("deploy/docker-compose.yml");
    let doc: Value = serde_yaml_ng::from_str(&text).unwrap();
    for (name, svc) in doc["services"].as_mapping().unwrap() {
        let raw = match &svc["environment"] {
            Value::Mapping(m) => m.iter().map(|(k, v)| (str_of(k), str_of(v))).collect(),
            Value::Sequence(s) => s
                .iter()
                .map(|i| {
                    let i = str_of(i);
                    let (k, v) = i.split_once('=').unwrap_or((&i, ""));
                    (k.to_string(), v.to_string())
                })
                .collect(),
            _ => Vec::new(),
        };
        for (k, v) in raw.iter().filter(|(k, _)| k.contains("TOKEN")) {
            assert!(
                v.is_empty() || v.starts_with("${"),
                "compose {}: {k} is hard-coded; use a variable",
                str_of(name)
            );
        }
    }
    // Without a token the stack must not start at all (compose's ${VAR:?...}).
    assert!(
        c.environment("lifeguard", &c.vars).is_err(),
        "compose starts lifeguard without ONEBOT_TOKEN"
    );
    assert!(
        c.vars.contains_key("ONEBOT_TOKEN"),
        ".env.example documents ONEBOT_TOKEN"
    );
    assert!(
        c.vars["ONEBOT_TOKEN"].is_empty(),
        ".env.example must not ship a token"
    );
}

#[test]
fn kubernetes_probes_ports_and_grace_match_the_binary() {
    let k = Kube::load();
    let lg = k.lifeguard(&Dockerfile::load());
    let c = k.container("lifeguard");

    assert_eq!(lg.listen().port(), port_of(DEFAULT_LISTEN));
    assert_eq!(lg.admin_listen().port(), port_of(DEFAULT_ADMIN_LISTEN));
    assert!(
        lg.admin_listen().ip().is_unspecified(),
        "the kubelet probes the Pod IP: the admin listener must not be on loopback"
    );
    let ports = Kube::container_ports(c);
    assert!(
        ports.contains(&lg.listen().port()),
        "containerPort {:?}",
        ports
    );
    assert!(
        ports.contains(&lg.admin_listen().port()),
        "containerPort {:?}",
        ports
    );

    for (probe, path) in [("readinessProbe", READY_PATH), ("livenessProbe", LIVE_PATH)] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            Kube::resolve_port(c, &get["port"]),
            lg.admin_listen().port(),
            "{probe} must ask the admin listener"
        );
    }

    let grace = k.pod()["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > lg.drain_timeout(),
        "terminationGracePeriodSeconds {grace} must exceed the drain timeout {:?}",
        lg.drain_timeout()
    );
    assert!(
        lg.env.contains_key("LIFEGUARD_DRAIN_TIMEOUT"),
        "set the drain timeout explicitly next to the grace period"
    );

    // Upstream: NapCat in the same Pod, on a port NapCat's container declares.
    let upstream = lg
        .setting("upstream", "LIFEGUARD_UPSTREAM")
        .expect("upstream");
    assert_eq!(upstream, format!("ws://127.0.0.1:{NAPCAT_WS_PORT}"));
    assert!(Kube::container_ports(k.container("napcat")).contains(&NAPCAT_WS_PORT));

    for container in seq(&k.pod()["containers"]) {
        for kind in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                assert!(
                    !container["resources"][kind][res].is_null(),
                    "container {}: resources.{kind}.{res}",
                    str_of(&container["name"])
                );
            }
        }
    }
}

#[test]
fn kubernetes_token_comes_from_the_example_secret() {
    let k = Kube::load();
    let c = k.container("lifeguard");
    for e in seq(&c["env"]) {
        let name = str_of(&e["name"]);
        if !name.contains("TOKEN") {
            continue;
        }
        assert!(e["value"].is_null(), "{name} is hard-coded; use a Secret");
        let r = &e["valueFrom"]["secretKeyRef"];
        assert_eq!(
            r["name"], k.secret["metadata"]["name"],
            "{name}: secret name"
        );
        let key = str_of(&r["key"]);
        let data = &k.secret["stringData"];
        assert!(
            !data[key.as_str()].is_null(),
            "secret.example.yaml has no key {key}"
        );
    }
    assert!(
        seq(&c["env"])
            .iter()
            .any(|e| e["name"] == "LIFEGUARD_ACCESS_TOKEN"),
        "the access token comes from the Secret"
    );
}

#[test]
fn kubernetes_shares_napcat_config_and_the_service_targets_lifeguard_only() {
    let k = Kube::load();
    let lg = k.lifeguard(&Dockerfile::load());
    let napcat = k.container("napcat");
    let lifeguard = k.container("lifeguard");

    let napcat_mount = seq(&napcat["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == "/app/napcat/config")
        .expect("napcat mounts /app/napcat/config");
    let watched = lg
        .napcat_config()
        .expect("lifeguard follows NapCat's config");
    let shared = seq(&lifeguard["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(watched.as_str()))
        .unwrap_or_else(|| panic!("lifeguard watches {watched}, which is not mounted"));
    assert_eq!(
        shared["name"], napcat_mount["name"],
        "the same volume as NapCat's"
    );
    assert_eq!(
        shared["subPath"], napcat_mount["subPath"],
        "the same subPath as NapCat's"
    );
    assert_eq!(
        shared["readOnly"].as_bool(),
        Some(true),
        "read-only for lifeguard"
    );
    let volume = seq(&k.pod()["volumes"])
        .iter()
        .find(|v| v["name"] == shared["name"])
        .expect("the shared volume is declared");
    assert!(
        volume["persistentVolumeClaim"].is_mapping() || volume["emptyDir"].is_mapping(),
        "the shared volume is a PVC or an emptyDir"
    );

    // The Service: lifeguard's client port and nothing else.
    let labels = &k.deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in k.service["spec"]["selector"]
        .as_mapping()
        .expect("selector")
    {
        assert_eq!(
            &labels[str_of(key).as_str()],
            value,
            "selector {key:?} matches the Pod"
        );
    }
    let ports = seq(&k.service["spec"]["ports"]);
    assert_eq!(ports.len(), 1, "the Service exposes one port: {ports:?}");
    let target = Kube::resolve_port(lifeguard, &ports[0]["targetPort"]);
    assert_eq!(target, lg.listen().port());
    assert_eq!(target, port_of(DEFAULT_LISTEN));

    // Kustomize lists what exists, and not the example Secret.
    let resources: Vec<String> = seq(&k.kustomization["resources"])
        .iter()
        .map(str_of)
        .collect();
    for must in ["deployment.yaml", "service.yaml"] {
        assert!(
            resources.iter().any(|r| r == must),
            "kustomization lists {must}"
        );
    }
    for r in &resources {
        assert!(
            root().join("deploy/kubernetes").join(r).is_file(),
            "kustomization: {r} missing"
        );
        assert!(!r.contains("example"), "kustomization must not deploy {r}");
    }
}

#[test]
fn systemd_unit_is_hardened_and_stops_after_the_drain() {
    let u = Unit::load();
    let exec = u.exec_start();
    assert_eq!(exec[0], "/usr/local/bin/lifeguard");
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("CapabilityBoundingSet", ""),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("EnvironmentFile", "/etc/lifeguard/lifeguard.env"),
    ] {
        assert_eq!(u.service(key), vec![value.to_string()], "unit: {key}");
    }
    assert!(!u.service("ProtectHome").is_empty(), "unit: ProtectHome");
    assert!(
        u.service("SystemCallFilter")
            .iter()
            .any(|f| f == "@system-service"),
        "unit: SystemCallFilter=@system-service"
    );

    let stop = seconds(&u.one("TimeoutStopSec"));
    for optional in [false, true] {
        let lg = u.lifeguard(optional);
        assert!(
            stop > lg.drain_timeout(),
            "{}: TimeoutStopSec {stop:?} must exceed the drain timeout {:?}",
            lg.what,
            lg.drain_timeout()
        );
        assert_eq!(lg.listen().port(), port_of(DEFAULT_LISTEN));
        assert_eq!(lg.admin_listen().port(), port_of(DEFAULT_ADMIN_LISTEN));
        // NapCat's config directory must be readable through ProtectSystem/ProtectHome.
        if let Some(dir) = lg.napcat_config() {
            let ro = u.service("ReadOnlyPaths");
            assert!(
                ro.iter()
                    .flat_map(|l| l.split_whitespace())
                    .map(|p| p.trim_start_matches(['-', '+']))
                    .any(|p| Path::new(&dir).starts_with(p)),
                "{}: {dir} is not under ReadOnlyPaths {ro:?}",
                lg.what
            );
        }
    }
}

#[test]
fn systemd_env_example_is_plain_key_value() {
    let text = read("deploy/systemd/lifeguard.env.example");
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("env example: not KEY=value: {line:?}"));
        assert!(
            !k.starts_with("export"),
            "systemd does not take `export`: {line:?}"
        );
        assert!(
            !v.contains(['"', '\'', '$']),
            "keep values plain (no quotes or $): {line:?}"
        );
    }
    let env = env_file(&text, false);
    assert!(
        env.contains_key("LIFEGUARD_UPSTREAM"),
        "the one required setting"
    );
}

#[test]
fn deploy_doc_covers_each_way() {
    let doc = read("docs/deploy.md");
    for must in [
        "docker/Dockerfile",
        "deploy/docker-compose.yml",
        "deploy/kubernetes",
        "deploy/systemd/lifeguard.service",
        "ONEBOT_WS_URLS",
        "ONEBOT_ACCESS_TOKEN",
        "NewWebSocketClient",
        "--client-heartbeat",
    ] {
        assert!(doc.contains(must), "docs/deploy.md does not mention {must}");
    }
}

// =======================================================================================
// CLI checks: the real binary, with exactly the environment each deployment gives it.

#[test]
fn cli_check_config_refuses_an_empty_environment() {
    // The control: env_clear() really hides this test's environment, and a missing
    // upstream is the usage error the deploy files must avoid.
    let out = run(&["check-config".to_string()], &Env::new());
    assert_eq!(out.status.code(), Some(EXIT_USAGE), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("upstream"),
        "{}",
        describe(&out)
    );
}

#[test]
fn cli_accepts_the_docker_image_settings() {
    assert_check_config_accepts(&Dockerfile::load().docker_run());
}

#[test]
fn cli_accepts_the_compose_settings() {
    assert_check_config_accepts(&Compose::load().lifeguard(&Dockerfile::load()));
}

#[test]
fn cli_accepts_the_kubernetes_settings() {
    assert_check_config_accepts(&Kube::load().lifeguard(&Dockerfile::load()));
}

#[test]
fn cli_accepts_the_systemd_settings() {
    let u = Unit::load();
    assert_check_config_accepts(&u.lifeguard(false));
    assert_check_config_accepts(&u.lifeguard(true));
}

#[test]
fn cli_healthcheck_asks_live_on_loopback() {
    let (port, seen) = fake_admin("200 OK");
    let (args, env) = healthcheck_launch(&[], port);
    let out = run(&args, &env);
    assert!(
        out.status.success(),
        "HEALTHCHECK against a 200:\n{}",
        describe(&out)
    );
    let line = seen
        .recv_timeout(Duration::from_secs(5))
        .expect("a request");
    assert!(
        line.starts_with(&format!("GET {LIVE_PATH} ")),
        "HEALTHCHECK asked {line:?}"
    );
}

#[test]
fn cli_healthcheck_ready_fails_on_503() {
    let (port, seen) = fake_admin("503 Service Unavailable");
    let (args, env) = healthcheck_launch(&["--ready"], port);
    let out = run(&args, &env);
    assert_eq!(
        out.status.code(),
        Some(1),
        "health --ready against a 503:\n{}",
        describe(&out)
    );
    let line = seen
        .recv_timeout(Duration::from_secs(5))
        .expect("a request");
    assert!(
        line.starts_with(&format!("GET {READY_PATH} ")),
        "asked {line:?}"
    );
}

#[test]
fn cli_healthcheck_fails_when_nothing_listens() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (args, env) = healthcheck_launch(&[], port);
    let out = run(&args, &env);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}
