//! A moto server (DynamoDB + STS emulator) on a free loopback port, for
//! this test process only; stopped on drop. It handles one request at a
//! time, so that its conditional writes are atomic as DynamoDB's are.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tools::free_port;

/// moto_server, handling one request at a time: its conditional writes
/// are not atomic otherwise (see the script).
const ONE_AT_A_TIME: &str = include_str!("moto_one_at_a_time.py");

pub struct Moto {
    child: Child,
    pub endpoint: String,
}

fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

impl Moto {
    /// Starts the emulator and waits until it answers.
    pub fn start() -> Moto {
        // moto_server's own interpreter (the symlink points into the venv).
        let bin = crate::tools::tool("moto_server");
        let python = std::fs::canonicalize(&bin).expect("moto_server resolves").with_file_name("python3");
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(&python)
                .args(["-c", ONE_AT_A_TIME, "-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server starts");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if answers(port) {
                    return Moto { child, endpoint: format!("http://127.0.0.1:{port}") };
                }
                if child.try_wait().unwrap().is_some() {
                    break; // lost the port race: try another one
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not start");
    }

    /// The standard AWS variables that point the SDK at this emulator.
    pub fn env(&self) -> HashMap<String, String> {
        [
            ("AWS_ENDPOINT_URL_DYNAMODB", self.endpoint.as_str()),
            ("AWS_ENDPOINT_URL_STS", self.endpoint.as_str()),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
