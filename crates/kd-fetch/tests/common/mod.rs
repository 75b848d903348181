//! A loopback HTTP server for download tests (Range, cut-off transfers, wrong bytes, stalls,
//! error codes, Hub headers) and fixture archives in the official layouts.
#![allow(dead_code)]
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::Digest;

/// How the server answers one path.
#[derive(Clone, Debug)]
pub enum Route {
    /// Serve the bytes, honouring Range.
    Ok(Vec<u8>),
    /// Honour Range, but the first `times` full transfers stop after `after` bytes.
    CutOnce {
        body: Vec<u8>,
        after: usize,
        times: usize,
    },
    /// Always answer 200 with the whole body, ignoring Range.
    IgnoreRange(Vec<u8>),
    /// Answer with this status code.
    Status(u16),
    /// Answer 200 with this body as `text/html` (a dead link's or a confirmation page).
    Html(Vec<u8>),
    /// Send headers and a few bytes, then go silent for this long.
    Stall(Duration),
}

/// One request the server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
}

pub struct Server {
    pub url: String,
    pub log: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    addr: std::net::SocketAddr,
}

impl Server {
    pub fn start(routes: Vec<(&str, Route)>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::new(Mutex::new(
            routes
                .into_iter()
                .map(|(p, r)| (p.to_string(), r))
                .collect(),
        ));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l2, s2) = (log.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (routes, log) = (routes.clone(), l2.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &routes, &log);
                });
            }
        });
        Server {
            url: format!("http://{addr}"),
            log,
            stop,
            handle: Some(handle),
            addr,
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(
    mut conn: TcpStream,
    routes: &Mutex<HashMap<String, Route>>,
    log: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push(Seen {
        path: path.clone(),
        range: range.clone(),
    });
    let route = routes.lock().unwrap().get(&path).cloned();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    let end_incl = range
        .as_deref()
        .and_then(|r| r.split('-').nth(1))
        .and_then(|s| s.parse::<usize>().ok());
    let (body, cut, honour) = match route {
        None => return status(&mut conn, 404),
        Some(Route::Status(s)) => return status(&mut conn, s),
        Some(Route::Html(page)) => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                page.len()
            )?;
            conn.write_all(&page)?;
            conn.flush()?;
            return Ok(());
        }
        Some(Route::Ok(b)) => (b, None, true),
        Some(Route::IgnoreRange(b)) => (b, None, false),
        Some(Route::CutOnce { body, after, times }) => {
            let mut cut = None;
            if times > 0 && start.is_none() {
                routes.lock().unwrap().insert(
                    path.clone(),
                    Route::CutOnce {
                        body: body.clone(),
                        after,
                        times: times - 1,
                    },
                );
                cut = Some(after);
            }
            (body, cut, true)
        }
        Some(Route::Stall(d)) => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n"
            )?;
            conn.write_all(&[0u8; 10])?;
            conn.flush()?;
            std::thread::sleep(d);
            return Ok(());
        }
    };
    let sha = hex::encode(sha2::Sha256::digest(&body));
    let hub =
        format!("ETag: \"{sha}\"\r\nX-Repo-Commit: 0123456789abcdef0123456789abcdef01234567\r\n");
    match start.filter(|_| honour) {
        Some(s) if s >= body.len() => {
            write!(conn, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", body.len())?;
        }
        Some(s) => {
            let e = end_incl.map_or(body.len() - 1, |e| e.min(body.len() - 1));
            write!(
                conn,
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{e}/{}\r\nContent-Length: {}\r\n{hub}Connection: close\r\n\r\n",
                body.len(),
                e + 1 - s
            )?;
            conn.write_all(&body[s..=e])?;
        }
        None => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{hub}Connection: close\r\n\r\n",
                body.len()
            )?;
            let n = cut.unwrap_or(body.len()).min(body.len());
            conn.write_all(&body[..n])?;
        }
    }
    conn.flush()?;
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let mut sink = Vec::new();
    let _ = reader.read_to_end(&mut sink);
    Ok(())
}

fn status(conn: &mut TcpStream, code: u16) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {code} Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// Deterministic pseudo-random bytes (incompressible enough that cut-offs land mid-archive).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn tar_gz(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // Raw name: lets a test write a `../` entry that `set_path` would refuse.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// `cifar-10-binary.tar.gz` in the official layout, `per_file` records per batch.
pub fn cifar10_archive(per_file: usize) -> Vec<u8> {
    let mut files = Vec::new();
    let record = |i: usize| {
        let mut r = vec![(i % 10) as u8];
        r.extend(noise(3072, i as u64));
        r
    };
    let batch = |k: usize| {
        (0..per_file)
            .flat_map(|i| record(k * per_file + i))
            .collect::<Vec<u8>>()
    };
    for k in 1..=5 {
        files.push((format!("cifar-10-batches-bin/data_batch_{k}.bin"), batch(k)));
    }
    files.push(("cifar-10-batches-bin/test_batch.bin".into(), batch(0)));
    let names = "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n";
    files.push((
        "cifar-10-batches-bin/batches.meta.txt".into(),
        names.as_bytes().to_vec(),
    ));
    tar_gz(&files)
}

/// `cifar-100-binary.tar.gz` in the official layout.
pub fn cifar100_archive(n: usize) -> Vec<u8> {
    let split = |off: usize| {
        (0..n)
            .flat_map(|i| {
                let fine = ((i + off) % 100) as u8;
                let mut r = vec![fine / 5, fine];
                r.extend(noise(3072, (i + off) as u64));
                r
            })
            .collect::<Vec<u8>>()
    };
    tar_gz(&[
        ("cifar-100-binary/train.bin".into(), split(0)),
        ("cifar-100-binary/test.bin".into(), split(7)),
    ])
}

/// A tar.gz with one entry whose path leaves the target.
pub fn traversal_archive() -> Vec<u8> {
    tar_gz(&[(
        "cifar-10-batches-bin/../../escaped.bin".into(),
        vec![1, 2, 3],
    )])
}

/// A zip holding `state_dicts/resnet50.pt` (and a sibling), with the given extra entry names.
pub fn teacher_zip(pt: &[u8], extra: &[&str]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let o = zip::write::SimpleFileOptions::default();
    w.start_file("state_dicts/resnet18.pt", o).unwrap();
    w.write_all(b"other model").unwrap();
    w.start_file("state_dicts/resnet50.pt", o).unwrap();
    w.write_all(pt).unwrap();
    for e in extra {
        w.start_file(*e, o).unwrap();
        w.write_all(b"x").unwrap();
    }
    w.finish().unwrap().into_inner()
}

pub fn md5_hex(b: &[u8]) -> String {
    hex::encode(md5::Md5::digest(b))
}
