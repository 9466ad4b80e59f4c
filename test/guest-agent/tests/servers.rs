//! The agent's servers on loopback: the UDP echo keeps up with the probe at 5000 pps (IPv4 and
//! IPv6 on one dual-stack socket) and the HTTP page answers over both families.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use katamaran_guest::net::{self, PageInfo};
use katamaran_probe::ProbeConfig;
use katamaran_test_skip::{skip, Tier};

/// A server thread, stopped and joined on drop (`wake` unblocks its accept/receive).
struct Server {
    stop: Arc<AtomicBool>,
    wake: Box<dyn Fn()>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        (self.wake)();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start_echo() -> (u16, Server) {
    let socket = net::bind_udp(0).expect("bind echo");
    let port = socket.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        net::serve_echo(&socket, &s).expect("echo");
    });
    // The echo's receive timeout lets it see the stop flag by itself.
    (port, Server { stop, wake: Box::new(|| {}), thread: Some(thread) })
}

fn ipv6_loopback() -> bool {
    std::net::UdpSocket::bind("[::1]:0").is_ok()
}

#[test]
fn the_echo_keeps_up_with_5000_pps() {
    let (port, _echo) = start_echo();
    let mut cfg = ProbeConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    cfg.rate = 5000;
    cfg.duration = Duration::from_secs(2);
    cfg.grace = Duration::from_millis(500);
    let r = katamaran_probe::run(&cfg).expect("probe");
    eprintln!("{r}");
    assert_eq!((r.sent, r.received, r.lost, r.duplicated), (10_000, 10_000, 0, 0));
}

#[test]
fn the_echo_answers_ipv6_on_the_same_socket() {
    if !ipv6_loopback() {
        skip(Tier::Ipv6, "no IPv6 loopback on this machine");
        return;
    }
    let (port, _echo) = start_echo();
    let mut cfg = ProbeConfig::new(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
    cfg.count = Some(500);
    cfg.grace = Duration::from_millis(300);
    let r = katamaran_probe::run(&cfg).expect("probe");
    assert_eq!((r.sent, r.received, r.lost), (500, 500, 0));
}

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

#[test]
fn the_http_page_reports_instance_and_disk_progress_over_ipv4_and_ipv6() {
    let status = tempfile::tempdir().expect("tempdir");
    std::fs::write(status.path().join("vdb"), format!("{:>20}\n", 1234)).expect("status");
    let listener = net::bind_tcp(0).expect("bind http");
    let port = listener.local_addr().expect("addr").port();
    let info = PageInfo { instance: "web-0".into(), status_dir: status.path().to_owned() };
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        net::serve_http(&listener, &info, &s).expect("http");
    });
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let _server = Server {
        stop,
        wake: Box::new(move || {
            let _ = TcpStream::connect(v4);
        }),
        thread: Some(thread),
    };

    let mut families = vec![v4];
    if ipv6_loopback() {
        families.push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)));
    }
    for addr in families {
        let response = get(addr, "/");
        let (head, body) = response.split_once("\r\n\r\n").expect("response");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{addr}: {head}");
        let page: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(page["instance"], "web-0");
        assert_eq!(page["disk_records"]["vdb"], 1234);
        assert!(page.get("uptime_ms").is_some() && page.get("hostname").is_some(), "{page}");
        assert!(get(addr, "/missing").starts_with("HTTP/1.1 404"));
    }
}
