//! Throwaway PostgreSQL servers made with the machine's `initdb`: used by
//! `chorus demo` and by the test harness.
//!
//! Each server lives in its own directory, listens on 127.0.0.1 only, runs
//! with `wal_level = logical`, and is stopped when dropped. PostgreSQL
//! refuses to run as root, so when this process is root the server runs as
//! the `postgres` OS user.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use thiserror::Error;

/// Why a local server could not be made or started.
#[derive(Debug, Error)]
pub enum LocalPgError {
    #[error(
        "PostgreSQL server programs (initdb, postgres) were not found. \
         Install them (Debian/Ubuntu: `apt-get install postgresql`; \
         Fedora: `dnf install postgresql-server`; macOS: `brew install postgresql`) \
         or point PG_BINDIR at the directory that holds initdb"
    )]
    NotInstalled,
    #[error("running as root needs a `postgres` OS user to run PostgreSQL as: {0}")]
    NoPostgresUser(String),
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("PostgreSQL on port {port} did not become ready within {secs} s; log:\n{log}")]
    NotReady { port: u16, secs: u64, log: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LocalPgError + '_ {
    move |source| LocalPgError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the PostgreSQL server programs are.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub bindir: PathBuf,
}

impl PgBinaries {
    /// Find `initdb` and `postgres`: `$PG_BINDIR` alone when it is set; else
    /// `PATH`, then the
    /// newest `/usr/lib/postgresql/*/bin` (Debian keeps them off `PATH`),
    /// then `pg_config --bindir`.
    pub fn find() -> Result<PgBinaries, LocalPgError> {
        let usable = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
        // An explicit PG_BINDIR is the only place looked at.
        if let Some(dir) = std::env::var_os("PG_BINDIR").map(PathBuf::from) {
            return if usable(&dir) {
                Ok(PgBinaries { bindir: dir })
            } else {
                Err(LocalPgError::NotInstalled)
            };
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("initdb").is_file() {
                    // Follow a symlinked initdb to the directory that also holds postgres.
                    let real = fs::canonicalize(dir.join("initdb")).ok();
                    let real_dir = real.as_deref().and_then(Path::parent).map(Path::to_owned);
                    for candidate in [Some(dir.clone()), real_dir].into_iter().flatten() {
                        if usable(&candidate) {
                            return Ok(PgBinaries { bindir: candidate });
                        }
                    }
                }
            }
        }
        let mut debian: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .filter(|(_, dir)| usable(dir))
            .collect();
        debian.sort();
        if let Some((_, dir)) = debian.pop() {
            return Ok(PgBinaries { bindir: dir });
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if usable(&dir) {
                return Ok(PgBinaries { bindir: dir });
            }
        }
        Err(LocalPgError::NotInstalled)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }
}

/// The OS user a server runs as, when this process is root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn run_as() -> Result<Option<RunAs>, LocalPgError> {
    let euid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1);
    if euid != 0 {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32, LocalPgError> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| LocalPgError::NoPostgresUser(e.to_string()))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                LocalPgError::NoPostgresUser(String::from_utf8_lossy(&out.stderr).trim().to_owned())
            })
    };
    Ok(Some(RunAs {
        uid: id("-u")?,
        gid: id("-g")?,
    }))
}

/// Options for a new server.
#[derive(Debug, Clone)]
pub struct LocalPgOptions {
    /// Superuser name. Default "postgres". (Not "chorus": with the default
    /// search_path "$user", public, such a role would create its tables in
    /// the chorus schema.)
    pub user: String,
    /// When set, TCP logins need this password (SCRAM-SHA-256); otherwise
    /// they are trusted.
    pub password: Option<String>,
    /// Extra `-c name=value` settings.
    pub settings: Vec<(String, String)>,
    /// TLS for TCP logins.
    pub tls: Option<LocalTls>,
}

/// A server's TLS: its certificate and key (PEM), and whether TCP logins
/// without TLS are refused (logins on the Unix socket never need it).
#[derive(Clone)]
pub struct LocalTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub required: bool,
}

impl Default for LocalPgOptions {
    fn default() -> Self {
        LocalPgOptions {
            user: "postgres".to_owned(),
            password: None,
            settings: Vec::new(),
            tls: None,
        }
    }
}

/// A throwaway PostgreSQL server.
pub struct LocalPostgres {
    bins: PgBinaries,
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    options: LocalPgOptions,
    child: Option<Child>,
}

impl LocalPostgres {
    /// `initdb` a new cluster in `dir` (created; must not exist or be empty)
    /// and start it on a free port.
    pub fn create(
        bins: &PgBinaries,
        dir: &Path,
        options: LocalPgOptions,
    ) -> Result<LocalPostgres, LocalPgError> {
        let run_as = run_as()?;
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        // The server user must be able to reach and own its directory.
        if let Some(user) = run_as {
            std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid)).map_err(io_err(dir))?;
            make_reachable(dir)?;
        }
        let data = dir.join("data");
        let mut initdb = Command::new(bins.program("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", &options.user, "-E", "UTF8", "--locale=C", "--no-sync"])
            .arg("--auth-local=trust");
        if let Some(password) = &options.password {
            let pwfile = dir.join("pwfile");
            fs::write(&pwfile, password).map_err(io_err(&pwfile))?;
            if let Some(user) = run_as {
                std::os::unix::fs::chown(&pwfile, Some(user.uid), Some(user.gid))
                    .map_err(io_err(&pwfile))?;
            }
            initdb
                .arg("--auth-host=scram-sha-256")
                .arg(format!("--pwfile={}", pwfile.display()));
        } else {
            initdb.arg("--auth-host=trust");
        }
        run_checked(initdb, run_as, "initdb")?;
        if let Some(tls) = &options.tls {
            set_up_tls(&data, tls, run_as)?;
        }
        let mut server = LocalPostgres {
            bins: bins.clone(),
            dir: dir.to_owned(),
            data,
            port: free_port()?,
            run_as,
            options,
            child: None,
        };
        server.start()?;
        Ok(server)
    }

    /// Start the server (again), on the port it had.
    pub fn start(&mut self) -> Result<(), LocalPgError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log_path = self.dir.join("postgres.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        if let Some(user) = self.run_as {
            let _ = std::os::unix::fs::chown(&log_path, Some(user.uid), Some(user.gid));
        }
        let log_err = log.try_clone().map_err(io_err(&log_path))?;
        // After a SIGKILL, orphaned backends may hold the old shared memory
        // for a moment; retry until they are gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut cmd = Command::new(self.bins.program("postgres"));
            cmd.arg("-D")
                .arg(&self.data)
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", self.dir.display()))
                .args(["-c", "wal_level=logical"])
                .args(["-c", "max_replication_slots=32"])
                .args(["-c", "max_wal_senders=32"])
                .args(["-c", "max_connections=200"])
                .args(["-c", "fsync=off"])
                .args(["-c", "full_page_writes=off"]);
            for (name, value) in &self.options.settings {
                cmd.arg("-c").arg(format!("{name}={value}"));
            }
            // Its own process group, so a terminal's Ctrl-C aimed at the
            // demo does not reach the server before the demo stops it.
            cmd.process_group(0)
                .current_dir("/")
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(io_err(&log_path))?)
                .stderr(log_err.try_clone().map_err(io_err(&log_path))?);
            if let Some(user) = self.run_as {
                cmd.uid(user.uid).gid(user.gid);
            }
            let child = cmd.spawn().map_err(|e| LocalPgError::Command {
                what: "starting postgres".into(),
                detail: e.to_string(),
            })?;
            self.child = Some(child);
            match self.wait_ready(deadline) {
                Ok(()) => return Ok(()),
                Err(Retry::Exited) if Instant::now() < deadline => {
                    self.child = None;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(_) => {
                    self.kill();
                    return Err(LocalPgError::NotReady {
                        port: self.port,
                        secs: 30,
                        log: self.log_tail(),
                    });
                }
            }
        }
    }

    fn wait_ready(&mut self, deadline: Instant) -> Result<(), Retry> {
        let pid_file = self.data.join("postmaster.pid");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return Err(Retry::Exited);
                }
                let pid = child.id().to_string();
                if let Ok(text) = fs::read_to_string(&pid_file) {
                    let lines: Vec<&str> = text.lines().collect();
                    // Line 1 is the postmaster's PID, line 8 its status.
                    if lines.first() == Some(&pid.as_str())
                        && lines.get(7).map(|s| s.trim()) == Some("ready")
                    {
                        return Ok(());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(Retry::TimedOut)
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join("postgres.log")) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Kill the server with SIGKILL, as a crash of its host would: the
    /// postmaster and every process it started. PostgreSQL makes each child
    /// its own process-group leader, so they are found through /proc; the
    /// postmaster is frozen first so it cannot fork new ones meanwhile.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let postmaster = child.id();
            let _ = signal(postmaster, Signal::SIGSTOP);
            for pid in children_of(postmaster) {
                let _ = signal(pid, Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freeze the server (SIGSTOP to the postmaster and every child), as a
    /// hung host would be: connections stay open but nothing answers.
    pub fn pause(&self) {
        self.signal_all(Signal::SIGSTOP);
    }

    /// Thaw a server frozen by [`LocalPostgres::pause`].
    pub fn resume(&self) {
        self.signal_all(Signal::SIGCONT);
    }

    fn signal_all(&self, sig: Signal) {
        if let Some(child) = &self.child {
            let postmaster = child.id();
            let _ = signal(postmaster, sig);
            for pid in children_of(postmaster) {
                let _ = signal(pid, sig);
            }
        }
    }

    /// Stop with a fast shutdown (SIGINT), waiting up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal(child.id(), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &str {
        &self.options.user
    }

    pub fn password(&self) -> Option<&str> {
        self.options.password.as_deref()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A libpq URL for a direct connection to `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            self.options.user, self.port, database
        )
    }

    /// A key-value connection string over the server's Unix socket.
    pub fn socket_conninfo(&self, database: &str) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            self.dir.display(),
            self.port,
            self.options.user,
            database
        )
    }

    /// A tokio-postgres / libpq key-value connection string.
    pub fn conninfo(&self, database: &str) -> String {
        let mut s = format!(
            "host=127.0.0.1 port={} user={} dbname={}",
            self.port, self.options.user, database
        );
        if let Some(password) = &self.options.password {
            s.push_str(&format!(" password={password}"));
        }
        s
    }
}

/// Give the server in `data` its certificate and key (the key readable by
/// the server's user alone, as PostgreSQL demands), turn TLS on, and, when
/// asked, refuse TCP logins without it.
impl std::fmt::Debug for LocalTls {
    /// The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTls")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

fn set_up_tls(data: &Path, tls: &LocalTls, run_as: Option<RunAs>) -> Result<(), LocalPgError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    for (name, pem, mode) in [
        ("server.crt", &tls.cert_pem, 0o644),
        ("server.key", &tls.key_pem, 0o600),
    ] {
        let path = data.join(name);
        fs::write(&path, pem).map_err(io_err(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io_err(&path))?;
        if let Some(user) = run_as {
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))
                .map_err(io_err(&path))?;
        }
    }
    let conf = data.join("postgresql.conf");
    fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut f| f.write_all(b"\nssl = on\n"))
        .map_err(io_err(&conf))?;
    if tls.required {
        let hba = data.join("pg_hba.conf");
        let rules = fs::read_to_string(&hba).map_err(io_err(&hba))?;
        let refuse = "hostnossl all all all reject\nhostnossl replication all all reject\n";
        fs::write(&hba, format!("{refuse}{rules}")).map_err(io_err(&hba))?;
    }
    Ok(())
}

enum Retry {
    Exited,
    TimedOut,
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Send a signal to a process.
fn signal(pid: u32, signal: Signal) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::errno::Errno::ESRCH)?;
    nix::sys::signal::kill(Pid::from_raw(pid), signal)
}

/// The processes whose parent is `parent`, read from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // The command name is in parentheses and may contain spaces; the
            // parent pid is the second field after it.
            let after = stat.rsplit_once(')')?.1;
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// Make sure another user can walk down to `dir`. Directories under the
/// system temp dir that only root can search (as `tempfile` makes them) are
/// opened up for searching (not listing); anywhere else this is an error
/// rather than a silent change to the permissions of the user's directories.
fn make_reachable(dir: &Path) -> Result<(), LocalPgError> {
    let temp = fs::canonicalize(std::env::temp_dir()).unwrap_or_else(|_| std::env::temp_dir());
    let dir = fs::canonicalize(dir).map_err(io_err(dir))?;
    for ancestor in dir.ancestors().skip(1) {
        let meta = fs::metadata(ancestor).map_err(io_err(ancestor))?;
        if meta.mode() & 0o001 != 0 {
            continue;
        }
        if ancestor.starts_with(&temp) && ancestor != temp {
            fs::set_permissions(ancestor, fs::Permissions::from_mode(meta.mode() | 0o011))
                .map_err(io_err(ancestor))?;
        } else {
            return Err(LocalPgError::Command {
                what: "preparing the data directory".into(),
                detail: format!(
                    "the postgres OS user cannot reach {}: {} is not searchable by other users; \
                     choose a directory under {} instead",
                    dir.display(),
                    ancestor.display(),
                    temp.display()
                ),
            });
        }
    }
    Ok(())
}

fn run_checked(mut cmd: Command, run_as: Option<RunAs>, what: &str) -> Result<(), LocalPgError> {
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    // Run from a directory every user can read.
    cmd.current_dir("/");
    let out = cmd.output().map_err(|e| LocalPgError::Command {
        what: what.to_owned(),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LocalPgError::Command {
            what: what.to_owned(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's
/// usual ephemeral range (32768 and up): a port the kernel hands out for
/// `:0` can be taken by an outgoing connection before the server that was
/// meant to get it binds it (seen as "address already in use" in tests that
/// start many servers). Never the same port twice in one process, so
/// servers started side by side (parallel tests) cannot be given the same.
pub fn free_port() -> Result<u16, LocalPgError> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let port = rand::random_range(20_000..32_000u16);
        let Ok(mut given) = GIVEN.lock() else {
            break;
        };
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err(Path::new("127.0.0.1:0")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io_err(Path::new("127.0.0.1:0")))
}
