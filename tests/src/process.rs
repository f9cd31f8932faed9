//! Child processes of the real binaries, with their stderr collected line by line.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child process whose stderr is collected by a thread. Dropping it kills the process.
pub struct Spawned {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Spawned {
    pub fn start(command: &mut Command) -> Spawned {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("lock").push(line);
            }
        });
        Spawned { child, lines }
    }

    /// Everything the process wrote to stderr so far.
    pub fn output(&self) -> String {
        self.lines.lock().expect("lock").join("\n")
    }

    /// Poll the log for a line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(line) = self
                .lines
                .lock()
                .expect("lock")
                .iter()
                .find(|line| line.contains(needle))
            {
                return Some(line.clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Wait for a node started with `--log-format json` to log that it serves, and return its
    /// proxy URL (`http://…`); panics with its output if it does not within `timeout`.
    pub fn serving_url(&self, timeout: Duration) -> String {
        let line = self
            .wait_for("skein is serving", timeout)
            .unwrap_or_else(|| panic!("the node did not start:\n{}", self.output()));
        let started: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        started["http"].as_str().expect("http").to_owned()
    }

    /// Send SIGTERM (by PID) and wait for the exit, up to `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.child.try_wait().expect("wait") {
                return Some(exit);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the process and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Run the `skein` CLI with `args` (no endpoint or token from the environment):
/// (success, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(crate::binary("skein").expect("binary"))
        .args(args)
        .env_remove("SKEIN_ADMIN_TOKEN")
        .env_remove("SKEIN_ENDPOINT")
        .output()
        .expect("run");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
