//! Resumable HTTP downloads: bytes go to `NAME.part`, an interrupted transfer resumes with a
//! `Range` request, a server that ignores `Range` restarts the file. No content decoding, so
//! byte offsets are the archive's own.
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use crate::progress::Progress;
use crate::{FetchError, Result};

/// A blocking HTTP client with connect and read timeouts (a stalled server is an error, not a hang).
#[derive(Clone)]
pub struct Http {
    agent: ureq::Agent,
}

impl Http {
    /// A client whose reads time out after `read_timeout` without data.
    pub fn new(read_timeout: Duration) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(read_timeout)
            .user_agent(concat!("kd-fetch/", env!("CARGO_PKG_VERSION")))
            .build();
        Http { agent }
    }

    /// Downloads `url` into `part`, resuming from what `part` already holds.
    /// Returns the final size of `part`. The caller verifies and renames it.
    pub fn download(
        &self,
        url: &str,
        part: &Path,
        expected_size: Option<u64>,
        progress: &Progress,
    ) -> Result<u64> {
        let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if let Some(n) = expected_size {
            if have == n {
                return Ok(have);
            }
            if have > n {
                std::fs::remove_file(part).map_err(FetchError::io(part))?;
                have = 0;
            }
        }
        let mut req = self.agent.get(url);
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            // Everything was already there.
            Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(have),
            Err(ureq::Error::Status(status, _)) => {
                return Err(FetchError::HttpStatus {
                    url: url.into(),
                    status,
                })
            }
            Err(e) => {
                // ureq's message starts with the URL, which the error prints itself.
                let text = e.to_string();
                let message = text.strip_prefix(&format!("{url}: ")).unwrap_or(&text);
                return Err(FetchError::Transport {
                    url: url.into(),
                    message: message.into(),
                });
            }
        };
        // No archive is served as a web page; a page here is an error page with status 200.
        let content_type = resp
            .header("Content-Type")
            .unwrap_or("")
            .to_ascii_lowercase();
        if content_type.starts_with("text/html") {
            return Err(FetchError::HtmlPage {
                url: url.into(),
                content_type,
            });
        }
        let append = have > 0 && resp.status() == 206;
        if append {
            let start = resp
                .header("Content-Range")
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if start != Some(have) {
                return Err(FetchError::Transport {
                    url: url.into(),
                    message: format!(
                        "asked to resume at byte {have}, server answered Content-Range {:?}",
                        resp.header("Content-Range")
                    ),
                });
            }
        } else {
            // 200 to a Range request: the server ignores Range; start over.
            have = 0;
        }
        let body_len = resp
            .header("Content-Length")
            .and_then(|v| v.parse::<u64>().ok());
        // The server's length decides when the transfer is complete; the checksum decides if it is right.
        let total = body_len.map(|l| l + have).or(expected_size);
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .map_err(FetchError::io(part))?;
        progress.start(total, have);
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = have;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    file.flush().map_err(FetchError::io(part))?;
                    let expected = total.unwrap_or(0);
                    tracing::warn!("{url}: {e} after {got} bytes");
                    return Err(FetchError::Truncated {
                        url: url.into(),
                        got,
                        expected,
                        part: part.into(),
                    });
                }
            };
            file.write_all(&buf[..n]).map_err(FetchError::io(part))?;
            got += n as u64;
            progress.advance(n as u64);
        }
        file.sync_all().map_err(FetchError::io(part))?;
        progress.finish();
        if let Some(t) = total {
            if got < t {
                return Err(FetchError::Truncated {
                    url: url.into(),
                    got,
                    expected: t,
                    part: part.into(),
                });
            }
        }
        Ok(got)
    }
}
