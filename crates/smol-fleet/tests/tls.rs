//! `smolfleet serve --tls-cert --tls-key`: HTTPS with a certificate made here (a test CA
//! and a leaf for 127.0.0.1), /health and an authenticated route through reqwest trusting
//! only that CA, an idle keep-alive connection past 30 s; bad certificate files fail the
//! start naming the file; plain HTTP beyond loopback needs `--insecure-no-tls`. No VMs.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use support::{json_ok, unauthorized};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

struct Certs {
    ca_pem: String,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and a leaf it signed for `127.0.0.1` and `localhost`, written under `dir`.
fn certs(dir: &Path) -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "smolfleet test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    Certs {
        ca_pem: ca.pem(),
        cert,
        key,
    }
}

fn smolfleet(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smolfleet"));
    c.arg("serve")
        .arg("--home")
        .arg(home)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("SMOL_LOG", "warn")
        .kill_on_drop(true);
    c
}

/// A started server: the child, its URL and its bootstrap key.
async fn serve(mut cmd: Command) -> (Child, String, String) {
    let mut child = cmd.spawn().expect("spawn smolfleet");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut key = None;
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(k) = line.split_whitespace().find(|w| w.starts_with("smk_")) {
                key = Some(k.to_string());
            }
            if let Some(u) = line.strip_prefix("listening on ") {
                return u.to_string();
            }
        }
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err).await;
        panic!("smolfleet exited before listening: {err}");
    })
    .await
    .expect("smolfleet did not start");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url, key.expect("the first start prints a key"))
}

/// The exit status and stderr of a start that must fail.
async fn refused(mut cmd: Command) -> String {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("smolfleet did not exit")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "it started: {err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "{err}"
    );
    err
}

/// One HTTP/1.1 request on `conn` (kept alive) and the status and body of its answer.
async fn request<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    conn: &mut S,
    path: &str,
) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let n = conn.read(&mut tmp).await.expect("read the answer");
        assert!(n > 0, "the server closed the connection: {buf:?}");
        buf.extend_from_slice(&tmp[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .expect("a content-length");
            if buf.len() >= end + 4 + len {
                let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
                return (status, text[end + 4..end + 4 + len].to_string());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_a_given_certificate_and_idle_keep_alive() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let home = dir.path().join("home");
    let mut cmd = smolfleet(&home, &["--listen", "127.0.0.1:0", "--tls-cert"]);
    cmd.arg(&certs.cert).arg("--tls-key").arg(&certs.key);
    let (_child, url, key) = serve(cmd).await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    let ca = reqwest::Certificate::from_pem(certs.ca_pem.as_bytes()).unwrap();
    let c = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let h = json_ok(
        c.get(format!("{url}/health")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(h["status"], "ok", "{h}");
    let list = json_ok(
        c.get(format!("{url}/v1/machines"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(list, serde_json::json!([]));
    unauthorized(c.get(format!("{url}/v1/machines")).send().await.unwrap()).await;

    // a client that does not trust the CA gets no answer; plain HTTP on the port neither
    let untrusting = reqwest::Client::builder().no_proxy().build().unwrap();
    let e = untrusting
        .get(format!("{url}/health"))
        .send()
        .await
        .expect_err("an untrusted certificate was accepted");
    eprintln!("untrusting client: {e:?}");
    let plain = url.replace("https://", "http://");
    assert!(
        untrusting
            .get(format!("{plain}/health"))
            .send()
            .await
            .is_err(),
        "plain HTTP answered on the TLS port"
    );

    // an idle keep-alive connection holds past the published client's 30 s pool
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let ca_der =
        tokio_rustls::rustls::pki_types::pem::PemObject::from_pem_slice(certs.ca_pem.as_bytes())
            .unwrap();
    roots.add(ca_der).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = url.trim_start_matches("https://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (status, body) = request(&mut tls, "/health").await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(32)).await;
    let (status, body) = request(&mut tls, "/health").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_certificate_files_fail_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs(dir.path());
    let home = dir.path().join("home");
    let missing = dir.path().join("no-such-cert.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let other = certs_in(&dir.path().join("other"));

    for (cert, key, named) in [
        (&missing, &certs.key, &missing),
        (&certs.cert, &missing, &missing),
        (&garbage, &certs.key, &garbage),
        (&certs.cert, &garbage, &garbage),
        // a key that is not the certificate's
        (&certs.cert, &other.key, &other.key),
    ] {
        let mut cmd = smolfleet(&home, &["--listen", "127.0.0.1:0"]);
        cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        let err = refused(cmd).await;
        assert!(
            err.contains(&named.display().to_string()),
            "{} / {}: {err}",
            cert.display(),
            key.display()
        );
    }
    // one without the other is a usage error
    let mut cmd = smolfleet(&home, &["--listen", "127.0.0.1:0", "--tls-cert"]);
    cmd.arg(&certs.cert);
    let err = refused(cmd).await;
    assert!(err.contains("--tls-key"), "{err}");
}

fn certs_in(dir: &Path) -> Certs {
    std::fs::create_dir_all(dir).unwrap();
    certs(dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_beyond_loopback_needs_the_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let err = refused(smolfleet(&home, &["--listen", "0.0.0.0:0"])).await;
    assert!(
        err.contains("0.0.0.0") && err.contains("--insecure-no-tls") && err.contains("--tls-cert"),
        "{err}"
    );
    // nothing was made: the refusal comes before the home is opened
    assert!(!home.join("fleet.db").exists());
    let (_child, url, _key) = serve(smolfleet(
        &home,
        &["--listen", "0.0.0.0:0", "--insecure-no-tls"],
    ))
    .await;
    assert!(url.starts_with("http://0.0.0.0:"), "{url}");
    let port = url.rsplit(':').next().unwrap();
    let r = support::client()
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
