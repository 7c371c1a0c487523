//! One child process of a test, from start to kill. Its stdout and stderr go to a log file,
//! appended across restarts, each run after a `==> tally-testkit: starting …` line. The test
//! waits until the process is ready, may SIGKILL it like a crash and start the same command
//! again (so on the same ports and data directory), and dropping the handle kills it. Every
//! error quotes the end of the log, which is where a process says why it would not start.
//!
//! The children are `std::process` ones, waited on by polling, so a handle belongs to no
//! tokio runtime: a server started inside one test's runtime may serve the tests after it
//! (see [`ManagedProcess::detach`]).

use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::wait::{wait_until, POLL_INTERVAL};

/// Lines of each log quoted in an error.
const ERROR_LOG_LINES: usize = 40;
/// How often a process that was sent SIGKILL is checked for its exit.
const REAP_INTERVAL: Duration = Duration::from_millis(5);
/// How long dropping a handle waits for the killed process to be gone.
const DROP_GRACE: Duration = Duration::from_secs(2);
/// How long dropping a [`Detached`] waits for its watchdog to kill the process.
const WATCHDOG_GRACE: Duration = Duration::from_secs(10);

/// A child process owned by a test; see the module documentation.
#[derive(Debug)]
pub struct ManagedProcess {
    /// What errors call it: `nats-server`, `tally ingest`.
    name: String,
    /// Kept to start the same process again on [`ManagedProcess::restart`].
    command: Command,
    log_path: PathBuf,
    /// Log files the process writes itself; their ends are quoted in errors too.
    own_logs: Vec<PathBuf>,
    /// Where in the log this run's output begins, after its header line.
    run_start: u64,
    /// `None` once killed: there is no process left to signal or to reap.
    child: Option<Child>,
}

impl ManagedProcess {
    /// Starts `command` with stdin from `/dev/null` and stdout and stderr appended to
    /// `log_path`. `name` is what errors call the process.
    pub fn start(
        name: impl Into<String>,
        command: Command,
        log_path: impl Into<PathBuf>,
    ) -> anyhow::Result<ManagedProcess> {
        let mut process = ManagedProcess {
            name: name.into(),
            command,
            log_path: log_path.into(),
            own_logs: Vec::new(),
            run_start: 0,
            child: None,
        };
        process.spawn()?;
        Ok(process)
    }

    /// The running process's id; `None` once killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|child| child.id())
    }

    /// Quotes the end of `path`, a log file the process writes itself, in errors too.
    pub fn with_own_log(mut self, path: impl Into<PathBuf>) -> ManagedProcess {
        self.own_logs.push(path.into());
        self
    }

    /// Waits until `probe` returns `Ok(true)`, asking as [`wait_until`] does. `what` is what
    /// the probe checks, said after the process's name ("accepting connections on …").
    ///
    /// Fails as soon as the process exits, and kills it once `deadline` has passed; either
    /// error quotes the end of its logs.
    pub async fn wait_ready<F, Fut>(
        &mut self,
        what: &str,
        deadline: Duration,
        probe: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<bool>>,
    {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        let waiting_for = format!("{} {what}", self.name);
        let failure = tokio::select! {
            ready = wait_until(&waiting_for, deadline, probe) => match ready {
                Ok(()) => return Ok(()),
                Err(timed_out) => format!("{timed_out:#}"),
            },
            status = exit_status(child) => {
                format!("{} exited with {status} before {what}", self.name)
            }
        };
        self.kill().await;
        bail!("{failure}\n{}", self.logs_for_error())
    }

    /// Waits until this run has printed a whole line containing `needle` and returns that
    /// line, such as the address a server prints once it listens. Fails as
    /// [`ManagedProcess::wait_ready`] does.
    pub async fn wait_for_line(
        &mut self,
        needle: &str,
        deadline: Duration,
    ) -> anyhow::Result<String> {
        let (log_path, run_start) = (self.log_path.clone(), self.run_start);
        let mut found = None;
        self.wait_ready(&format!("printing `{needle}`"), deadline, || {
            found = line_containing(&read_from(&log_path, run_start), needle);
            let printed = found.is_some();
            async move { Ok(printed) }
        })
        .await?;
        Ok(found.expect("ready only once the line was found"))
    }

    /// What this run has printed so far, stdout and stderr, without the runs before it.
    pub fn output(&self) -> String {
        read_from(&self.log_path, self.run_start)
    }

    /// Whether the process is gone: exited by itself, or killed.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(Some(_))),
            None => true,
        }
    }

    /// SIGKILL, like a crash: the process gets no chance to clean up. Returns once it has
    /// been reaped, so its ports and files are free again. Does nothing if it is not running.
    pub async fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Fails only when the process has exited already, which is as good.
        let _ = child.kill();
        while matches!(child.try_wait(), Ok(None)) {
            tokio::time::sleep(REAP_INTERVAL).await;
        }
    }

    /// SIGTERM, as an orchestrator stops a container, then waits up to `deadline` for the
    /// process to exit. Returns its exit status and how long it took; past the deadline the
    /// process is killed and this fails.
    pub async fn terminate(
        &mut self,
        deadline: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        let started = std::time::Instant::now();
        let signalled = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        anyhow::ensure!(signalled.success(), "could not signal {}", self.name);
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > deadline {
                self.kill().await;
                bail!(
                    "{} still running {deadline:?} after SIGTERM\n{}",
                    self.name,
                    self.logs_for_error()
                );
            }
            tokio::time::sleep(REAP_INTERVAL).await;
        }
    }

    /// Kills the process if it is running and starts the same command again, so on the same
    /// ports and data directory. Wait for it with [`ManagedProcess::wait_ready`].
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        self.spawn()
    }

    /// The file that receives the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the log, all runs.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// Hands the process to a watchdog, for a server that serves every test of the process
    /// and so is never dropped (it lives in a static). When the returned handle is dropped,
    /// or when the test process exits, however it exits, the watchdog kills the process and
    /// then removes `dir` with everything in it.
    pub fn detach(mut self, dir: &Path) -> anyhow::Result<Detached> {
        let Some(child) = self.child.take() else {
            bail!("{} is not running", self.name);
        };
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(child.id().to_string())
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match watchdog {
            Ok(watchdog) => Ok(Detached {
                child,
                watchdog,
                dir: dir.to_owned(),
            }),
            Err(err) => {
                // Killed with the handle, as if it had never been detached.
                self.child = Some(child);
                Err(err).context("starting sh for the watchdog")
            }
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        debug_assert!(self.child.is_none(), "{} is still running", self.name);
        let log_path = &self.log_path;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let header = format!(
            "==> tally-testkit: starting {}\n",
            command_line(&self.command)
        );
        log.write_all(header.as_bytes())
            .with_context(|| format!("writing to {}", log_path.display()))?;
        // With O_APPEND the file's length is where this run's output will begin.
        self.run_start = log
            .metadata()
            .with_context(|| format!("reading the length of {}", log_path.display()))?
            .len();
        let stderr = log.try_clone().context("duplicating the log file handle")?;
        self.command.stdin(Stdio::null()).stdout(log).stderr(stderr);
        let child = self.command.spawn().with_context(|| {
            format!(
                "cannot run `{}`",
                self.command.get_program().to_string_lossy()
            )
        })?;
        self.child = Some(child);
        Ok(())
    }

    fn logs_for_error(&self) -> String {
        let own_logs = self.own_logs.iter().filter(|path| path.exists());
        std::iter::once(&self.log_path)
            .chain(own_logs)
            .map(|path| {
                format!(
                    "--- end of {}:\n{}",
                    path.display(),
                    log_tail(path, ERROR_LOG_LINES)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        // Waits for the exit too (briefly, and without a runtime, which may be gone), so an
        // owner's temporary directory is not removed under a live process.
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        let started = Instant::now();
        while matches!(child.try_wait(), Ok(None)) && started.elapsed() < DROP_GRACE {
            std::thread::sleep(REAP_INTERVAL);
        }
    }
}

/// Run by `sh -c` with the process id as `$1` and the directory as `$2`. Only the test
/// process holds the write end of the watchdog's stdin, so end-of-file there means the
/// [`Detached`] handle was dropped or the test process is gone. The directory is removed once
/// the process is gone; `kill -0` still finds a zombie, so the test process must reap it
/// (as [`Detached`]'s `Drop` does) or be gone itself (then init reaps it).
const WATCHDOG: &str = r#"
cat >/dev/null
kill -9 "$1" 2>/dev/null
while kill -0 "$1" 2>/dev/null; do sleep 0.05; done
rm -rf "$2"
"#;

/// A process handed to a watchdog by [`ManagedProcess::detach`]. Dropping it kills the
/// process and returns once the directory is removed.
#[derive(Debug)]
pub struct Detached {
    child: Child,
    watchdog: Child,
    dir: PathBuf,
}

impl Detached {
    /// The directory the watchdog removes.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        drop(self.watchdog.stdin.take());
        // A running child is reaped only after the watchdog's SIGKILL, so that signal cannot
        // reach another process that took over the id. (One that had exited by itself is
        // reaped at once; the watchdog signalling its id a moment later is a race not worth
        // closing in tests.)
        let started = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) {
            if started.elapsed() >= WATCHDOG_GRACE {
                // The watchdog is gone (or stuck); nothing else signals this id now.
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(REAP_INTERVAL);
        }
        let _ = self.watchdog.wait();
    }
}

/// The last `lines` lines of a text file, or a note why it could not be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// Resolves once `child` has exited, with its exit status in words.
async fn exit_status(child: &mut Child) -> String {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) => tokio::time::sleep(POLL_INTERVAL).await,
            Err(err) => return format!("an unknown status ({err})"),
        }
    }
}

/// The file's text from byte `offset` on; empty if it cannot be read.
fn read_from(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).map_or(bytes.len(), |start| start.min(bytes.len()));
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The first whole (newline-terminated) line of `text` containing `needle`, without the
/// newline; a line still being written does not count.
fn line_containing(text: &str, needle: &str) -> Option<String> {
    text.split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n'))
        .find(|line| line.contains(needle))
        .map(str::to_owned)
}

/// The program and its arguments, for the log's header line.
fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| word.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        command
    }

    /// A process that prints its id and sleeps; returns it once it has printed.
    async fn sleeper(log: &Path) -> (ManagedProcess, u32) {
        let mut process =
            ManagedProcess::start("sleeper", sh("echo $$; exec sleep 60"), log).unwrap();
        let pid = process
            .wait_for_line("", Duration::from_secs(10))
            .await
            .unwrap()
            .parse()
            .unwrap();
        (process, pid)
    }

    fn alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[tokio::test]
    async fn waits_for_a_line_kills_and_restarts_with_the_same_command() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("out.log");
        let script = "echo starting >&2; sleep 0.2; echo \"serving on port $$\"; exec sleep 60";
        let mut process = ManagedProcess::start("pretend-server", sh(script), &log).unwrap();
        let first = process
            .wait_for_line("serving on", Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!process.exited());
        assert!(
            process.output().contains("starting\n"),
            "{}",
            process.output()
        );

        process.kill().await;
        assert!(process.exited());
        let pid: u32 = first.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(!alive(pid), "{pid} still there after kill");

        process.restart().await.unwrap();
        let second = process
            .wait_for_line("serving on", Duration::from_secs(10))
            .await
            .unwrap();
        assert_ne!(first, second, "found the first run's line again");
        assert!(!process.output().contains(&first), "{}", process.output());

        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.matches("==> tally-testkit: starting sh -c").count(), 2);
        assert!(text.contains(&first) && text.contains(&second), "{text}");
        assert_eq!(process.log_tail(1), second);
    }

    #[tokio::test]
    async fn an_exit_before_ready_fails_at_once_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        // printf, so the header line (which quotes the script) does not hold the message.
        let script = "printf 'bad config: %s\\n' port >&2; exit 3";
        let mut process =
            ManagedProcess::start("broken-server", sh(script), dir.path().join("log")).unwrap();
        let started = Instant::now();
        let err = process
            .wait_ready("answering", Duration::from_secs(30), || async { Ok(false) })
            .await
            .unwrap_err()
            .to_string();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited for the deadline"
        );
        assert!(
            err.contains("broken-server exited with exit status: 3"),
            "{err}"
        );
        assert!(err.contains("bad config: port"), "{err}");
    }

    #[tokio::test]
    async fn a_deadline_kills_and_quotes_every_log() {
        let dir = tempfile::tempdir().unwrap();
        let own_log = dir.path().join("server.err.log");
        let script = format!(
            "printf 'disk %s\\n' slow >{}; printf 'still %s\\n' loading; exec sleep 60",
            own_log.display()
        );
        let mut process = ManagedProcess::start("slow-server", sh(&script), dir.path().join("log"))
            .unwrap()
            .with_own_log(&own_log)
            .with_own_log(dir.path().join("never-written.log"));
        let first_line = process
            .wait_for_line("", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(first_line, "still loading");
        let err = process
            .wait_ready("answering", Duration::from_millis(200), || async {
                anyhow::bail!("connection refused")
            })
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("waiting for slow-server answering"), "{err}");
        assert!(err.contains("connection refused"), "{err}");
        assert!(err.contains("still loading"), "{err}");
        assert!(err.contains("disk slow"), "{err}");
        assert!(!err.contains("never-written"), "{err}");
        assert!(process.exited(), "not killed at the deadline");
    }

    #[tokio::test]
    async fn drop_kills_and_reaps() {
        let dir = tempfile::tempdir().unwrap();
        let (process, pid) = sleeper(&dir.path().join("log")).await;
        assert!(alive(pid));
        drop(process);
        assert!(!alive(pid), "{pid} still there after drop");
    }

    #[test]
    fn a_missing_program_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = ManagedProcess::start(
            "nothing",
            Command::new("tally-testkit-no-such-program"),
            dir.path().join("log"),
        )
        .unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("cannot run `tally-testkit-no-such-program`"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_detached_process_goes_with_its_directory() {
        let dir = tempfile::tempdir().unwrap().keep();
        let (process, pid) = sleeper(&dir.join("log")).await;
        let detached = process.detach(&dir).unwrap();
        assert_eq!(detached.dir(), dir);
        assert!(alive(pid), "detaching stopped it");

        tokio::task::spawn_blocking(move || drop(detached))
            .await
            .unwrap();
        assert!(!alive(pid), "{pid} still there after the watchdog");
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
