//! nginx from Debian, run by a test in its own directory: as an upstream
//! (TLS, HTTP/2, client certificates) or in front of gracesrv.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Nginx {
    child: Child,
    pub dir: PathBuf,
}

impl Nginx {
    /// Starts nginx in `dir` with `servers` (the `server { }` blocks of its
    /// `http { }`), and waits until every address in `addrs` accepts.
    pub async fn start(dir: &Path, servers: &str, addrs: &[SocketAddr]) -> Nginx {
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log stderr warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
             fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
             {servers}\n}}\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .spawn()
            .expect("nginx (Debian package nginx) must be installed");
        let nginx = Nginx {
            child,
            dir: dir.to_path_buf(),
        };
        for addr in addrs {
            let deadline = std::time::Instant::now() + super::WAIT;
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "nginx does not listen on {addr}"
                );
                // Connecting is the readiness check; nginx has no other.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
