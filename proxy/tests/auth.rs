//! Logins to Chorus (SCRAM-SHA-256, md5, trust, reject, TLS) and bad input:
//! garbage, malformed, truncated and oversized messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use chorus_testkit as testkit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use testkit::{run_pg_program, stderr, stdout, Options, TestNode};

fn auth_options() -> Options {
    Options {
        extra_toml: "[[users]]\nname = \"md5user\"\npassword = \"md5-pw\"\n\
                     [[users]]\nname = \"trusted\"\npassword = \"trusted-pw\"\n\
                     [[auth]]\nuser = \"md5user\"\nmethod = \"md5\"\n\
                     [[auth]]\nuser = \"trusted\"\naddress = \"127.0.0.1/32\"\nmethod = \"trust\"\n\
                     [[auth]]\nuser = \"blocked\"\nmethod = \"reject\"\n\
                     [[auth]]\nmethod = \"scram-sha-256\"\n"
            .to_owned(),
        node_toml: "max_message_bytes = 65536".to_owned(),
        ..Options::default()
    }
}

async fn create_roles(node: &TestNode) {
    node.direct()
        .await
        .batch_execute(
            "CREATE ROLE md5user LOGIN PASSWORD 'md5-pw'; \
             CREATE ROLE trusted LOGIN PASSWORD 'trusted-pw';",
        )
        .await
        .unwrap();
}

async fn login(node: &TestNode, user: &str, password: Option<&str>) -> Result<String, String> {
    match testkit::connect(&node.conninfo(user, password)).await {
        Ok(client) => {
            let row = client
                .query_one("SELECT current_user::text", &[])
                .await
                .unwrap();
            Ok(row.get(0))
        }
        Err(e) => Err(testkit::sqlstate(&e).unwrap_or_else(|| e.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_md5_trust_and_reject() {
    let node = testkit::start(auth_options()).await;
    create_roles(&node).await;

    assert_eq!(
        login(&node, testkit::PG_USER, Some(testkit::PG_PASSWORD)).await,
        Ok(testkit::PG_USER.to_owned())
    );
    assert_eq!(
        login(&node, testkit::PG_USER, Some("wrong")).await,
        Err("28P01".to_owned())
    );
    // An unknown user fails exactly like a wrong password.
    assert_eq!(
        login(&node, "nobody", Some("whatever")).await,
        Err("28P01".to_owned())
    );
    assert_eq!(
        login(&node, "md5user", Some("md5-pw")).await,
        Ok("md5user".to_owned())
    );
    assert_eq!(
        login(&node, "md5user", Some("nope")).await,
        Err("28P01".to_owned())
    );
    // Trust at the proxy; the proxy still logs in to the backend with SCRAM.
    assert_eq!(
        login(&node, "trusted", None).await,
        Ok("trusted".to_owned())
    );
    assert_eq!(
        login(&node, "blocked", Some("x")).await,
        Err("28000".to_owned())
    );

    // psql with SCRAM, and the wrong password message it shows.
    let url = node.url();
    let ok = run_pg_program(
        "psql",
        &[url.as_str(), "-X", "-At", "-c", "SELECT 'scram ok'"],
        &node.libpq_env(),
        Duration::from_secs(30),
    );
    assert_eq!(stdout(&ok).trim(), "scram ok", "{}", stderr(&ok));
    let bad = run_pg_program(
        "psql",
        &[url.as_str(), "-X", "-c", "SELECT 1"],
        &[("PGPASSWORD", "bad".to_owned())],
        Duration::from_secs(30),
    );
    assert!(
        stderr(&bad).contains("password authentication failed for user \"postgres\""),
        "{}",
        stderr(&bad)
    );

    let metrics = node.http_get("/metrics").await.1;
    let auth_errors = metrics
        .lines()
        .find(|l| l.starts_with("chorus_errors_total{kind=\"auth\"}"))
        .unwrap();
    let count: f64 = auth_errors.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 5.0, "{auth_errors}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_login_with_psql() {
    let node = testkit::start(Options {
        tls: true,
        ..Options::default()
    })
    .await;
    let url = format!("{}?sslmode=require", node.url());
    let out = run_pg_program(
        "psql",
        &[
            url.as_str(),
            "-X",
            "-c",
            "\\conninfo",
            "-c",
            "SELECT 'over tls'",
        ],
        &node.libpq_env(),
        Duration::from_secs(30),
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("SSL connection (protocol: TLSv1."), "{text}");
    assert!(text.contains("over tls"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_tls_sslmode_require_fails_and_prefer_falls_back() {
    let node = testkit::start(Options::default()).await;
    let require = run_pg_program(
        "psql",
        &[
            &format!("{}?sslmode=require", node.url()),
            "-X",
            "-c",
            "SELECT 1",
        ],
        &node.libpq_env(),
        Duration::from_secs(30),
    );
    assert!(!require.status.success());
    assert!(
        stderr(&require).contains("server does not support SSL"),
        "{}",
        stderr(&require)
    );
    let prefer = run_pg_program(
        "psql",
        &[
            &format!("{}?sslmode=prefer", node.url()),
            "-X",
            "-At",
            "-c",
            "SELECT 'plain'",
        ],
        &node.libpq_env(),
        Duration::from_secs(30),
    );
    assert_eq!(stdout(&prefer).trim(), "plain", "{}", stderr(&prefer));
}

/// Read whatever the proxy answers until it closes the connection.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("proxy did not close the connection")
        .ok();
    out
}

/// The SQLSTATE of the first ErrorResponse in a byte stream.
fn first_error_code(bytes: &[u8]) -> Option<(String, String)> {
    let mut pos = 0;
    while pos + 5 <= bytes.len() {
        let tag = bytes[pos];
        let len = u32::from_be_bytes(bytes[pos + 1..pos + 5].try_into().unwrap()) as usize;
        let body = bytes.get(pos + 5..pos + 1 + len)?;
        if tag == b'E' {
            let mut severity = String::new();
            let mut code = String::new();
            for field in body.split(|&b| b == 0) {
                match field.first() {
                    Some(b'V') => severity = String::from_utf8_lossy(&field[1..]).into(),
                    Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into(),
                    _ => {}
                }
            }
            return Some((severity, code));
        }
        pos += 1 + len;
    }
    None
}

fn startup_packet(params: &[(&str, &str)], version: u32) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    packet
}

/// Log in as the trusted user over a raw socket; returns the stream after
/// the first ReadyForQuery and everything received up to it.
async fn raw_login(node: &TestNode, version: u32, extra: &[(&str, &str)]) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let mut params = vec![("user", "trusted"), ("database", "postgres")];
    params.extend_from_slice(extra);
    stream
        .write_all(&startup_packet(&params, version))
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed during login: {received:?}");
        received.extend_from_slice(&buf[..n]);
        // ReadyForQuery is the last message of a login: 'Z', length 5, status.
        if received.len() >= 6
            && received[received.len() - 6..received.len() - 1] == [b'Z', 0, 0, 0, 5]
        {
            return (stream, received);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_malformed_messages_get_08p01_and_others_keep_working() {
    let node = testkit::start(auth_options()).await;
    create_roles(&node).await;
    let survivor = node.client().await;

    // Not PostgreSQL at all.
    let mut http = TcpStream::connect(node.addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut http).await;
    assert_eq!(
        first_error_code(&answer),
        Some(("FATAL".into(), "08P01".into()))
    );

    // A startup packet that claims to be shorter than its header.
    let mut short = TcpStream::connect(node.addr).await.unwrap();
    short.write_all(&[0, 0, 0, 2, 9, 9, 9, 9]).await.unwrap();
    assert_eq!(
        first_error_code(&read_until_closed(&mut short).await),
        Some(("FATAL".into(), "08P01".into()))
    );

    // An unsupported protocol version.
    let mut old = TcpStream::connect(node.addr).await.unwrap();
    old.write_all(&startup_packet(&[("user", "trusted")], 2 << 16))
        .await
        .unwrap();
    assert_eq!(
        first_error_code(&read_until_closed(&mut old).await),
        Some(("FATAL".into(), "0A000".into()))
    );

    // After login: a message with an impossible length.
    let (mut session, _) = raw_login(&node, 3 << 16, &[]).await;
    session.write_all(&[b'Q', 0, 0, 0, 1]).await.unwrap();
    assert_eq!(
        first_error_code(&read_until_closed(&mut session).await),
        Some(("FATAL".into(), "08P01".into()))
    );

    // After login: a message over max_message_bytes (64 KiB here).
    let (mut session, _) = raw_login(&node, 3 << 16, &[]).await;
    let mut huge = vec![b'Q'];
    huge.extend_from_slice(&(1u32 << 20).to_be_bytes());
    huge.extend_from_slice(&[b'x'; 1024]);
    session.write_all(&huge).await.unwrap();
    assert_eq!(
        first_error_code(&read_until_closed(&mut session).await),
        Some(("FATAL".into(), "08P01".into()))
    );

    // A message cut off by the client closing: nothing breaks.
    let (mut session, _) = raw_login(&node, 3 << 16, &[]).await;
    session
        .write_all(&[b'Q', 0, 0, 0, 20, b'S', b'E'])
        .await
        .unwrap();
    drop(session);

    // Random bytes from many connections at once.
    let mut state: u64 = 0x1234_5678_9abc_def1;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut junk = Vec::new();
        for _ in 0..64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            junk.push(state as u8);
        }
        let addr = node.addr;
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(&junk).await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    // The session opened before all this still works, and so do new ones.
    let one: i32 = survivor.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    assert_eq!(
        login(&node, testkit::PG_USER, Some(testkit::PG_PASSWORD)).await,
        Ok(testkit::PG_USER.to_owned())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gssenc_and_ssl_requests_are_declined_then_login_proceeds() {
    let node = testkit::start(auth_options()).await;
    create_roles(&node).await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    for code in [80877104u32, 80877103] {
        let mut request = 8u32.to_be_bytes().to_vec();
        request.extend_from_slice(&code.to_be_bytes());
        stream.write_all(&request).await.unwrap();
        let mut answer = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer[0], b'N');
    }
    let params = [("user", "trusted"), ("database", "postgres")];
    stream
        .write_all(&startup_packet(&params, 3 << 16))
        .await
        .unwrap();
    let mut first = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    // AuthenticationOk: 'R', length 8, code 0.
    assert_eq!(first, [b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn newer_protocol_minor_version_is_negotiated_down() {
    let node = testkit::start(auth_options()).await;
    create_roles(&node).await;
    // Protocol 3.2 with an unknown protocol option, as a newer libpq may send.
    let (mut session, received) =
        raw_login(&node, (3 << 16) | 2, &[("_pq_.future_option", "on")]).await;
    assert_eq!(received[0], b'v', "expected NegotiateProtocolVersion first");
    let len = u32::from_be_bytes(received[1..5].try_into().unwrap()) as usize;
    let body = &received[5..1 + len];
    assert_eq!(&body[..4], &0i32.to_be_bytes(), "newest minor version");
    assert_eq!(&body[4..8], &1i32.to_be_bytes(), "one unrecognized option");
    assert_eq!(&body[8..], b"_pq_.future_option\0");
    // The session works at 3.0.
    let mut query = vec![b'Q'];
    let sql = b"SELECT 7\0";
    query.extend_from_slice(&((sql.len() + 4) as u32).to_be_bytes());
    query.extend_from_slice(sql);
    session.write_all(&query).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), session.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf[0], b'T', "{:?}", &buf[..n]);
}

/// The error and its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Chorus's own connections to a backend (sessions' and streams' logins,
/// and control connections) follow the backend's `sslmode` as libpq does.
#[tokio::test(flavor = "multi_thread")]
async fn backend_connections_follow_sslmode_as_libpq_does() {
    use chorus_proxy::backend::{self, BackendTls, LoginParams, SslMode};
    use chorus_proxy::config::{BackendConfig, ReplicationConfig};
    use chorus_proxy::localpg::{LocalPgOptions, LocalPostgres};

    let dir = tempfile::tempdir().unwrap();
    let ca = testkit::TestCa::new(dir.path(), "ca");
    let other_ca = testkit::TestCa::new(dir.path(), "other-ca");
    // One server whose certificate names localhost only, one without TLS.
    let start = |name: &str, tls| {
        tokio::task::block_in_place(|| {
            LocalPostgres::create(
                &testkit::pg_binaries(),
                &dir.path().join(name),
                LocalPgOptions {
                    tls,
                    ..LocalPgOptions::default()
                },
            )
        })
        .unwrap()
    };
    let with_tls = start("tls", Some(ca.issue(&["localhost"])));
    let plain = start("plain", None);

    // (server, host, sslmode, root certificate) -> the login's outcome:
    // whether it is encrypted, or why it failed; the same for the raw
    // login and for a control connection.
    let attempt = |pg: &LocalPostgres, host: &str, mode: SslMode, root: Option<&Path>| {
        let backend = BackendConfig {
            name: "b".into(),
            host: host.into(),
            port: pg.port(),
            sslmode: mode,
            sslrootcert: root.map(Path::to_owned),
            tls: BackendTls::new(mode, root, host).unwrap(),
        };
        async move {
            let address = backend.address();
            let login = LoginParams {
                address: &address,
                tls: backend.tls.as_ref(),
                user: "postgres",
                password: None,
                database: "postgres",
                params: &[],
            };
            let raw = backend::connect(&login, Duration::from_secs(5))
                .await
                .map(|c| c.stream.is_tls())
                .map_err(|e| chain(&e));
            let control =
                match backend::connect_backend(&backend, &ReplicationConfig::default()).await {
                    Ok(client) => Ok(client
                        .query_one(
                            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                            &[],
                        )
                        .await
                        .unwrap()
                        .get::<_, bool>(0)),
                    Err(e) => Err(chain(&e)),
                };
            (raw, control)
        }
    };
    let both = |outcome: (Result<bool, String>, Result<bool, String>)| {
        assert_eq!(
            outcome.0.is_ok(),
            outcome.1.is_ok(),
            "the raw login and the control connection disagree: {outcome:?}"
        );
        match outcome {
            (Ok(raw), Ok(control)) => {
                assert_eq!(raw, control);
                Ok(raw)
            }
            (Err(raw), Err(control)) => Err(format!("{raw} / {control}")),
            _ => unreachable!(),
        }
    };
    let ca_path = ca.path.as_path();
    let ip = "127.0.0.1";

    assert_eq!(
        both(attempt(&with_tls, ip, SslMode::Disable, None).await),
        Ok(false)
    );
    assert_eq!(
        both(attempt(&with_tls, ip, SslMode::Prefer, None).await),
        Ok(true)
    );
    assert_eq!(
        both(attempt(&plain, ip, SslMode::Prefer, None).await),
        Ok(false)
    );
    // require: encrypted, the certificate taken as it is.
    assert_eq!(
        both(attempt(&with_tls, ip, SslMode::Require, None).await),
        Ok(true)
    );
    let refused = both(attempt(&plain, ip, SslMode::Require, None).await).unwrap_err();
    assert!(
        refused.contains("does not support SSL") || refused.contains("server does not support TLS"),
        "{refused}"
    );
    // verify-ca: the chain counts, not the name.
    assert_eq!(
        both(attempt(&with_tls, ip, SslMode::VerifyCa, Some(ca_path)).await),
        Ok(true)
    );
    let foreign =
        both(attempt(&with_tls, ip, SslMode::VerifyCa, Some(&other_ca.path)).await).unwrap_err();
    assert!(foreign.to_lowercase().contains("issuer"), "{foreign}");
    // require with a root certificate checks the chain, as libpq does.
    let foreign =
        both(attempt(&with_tls, ip, SslMode::Require, Some(&other_ca.path)).await).unwrap_err();
    assert!(foreign.to_lowercase().contains("issuer"), "{foreign}");
    // verify-full: the chain and the name.
    let misnamed =
        both(attempt(&with_tls, ip, SslMode::VerifyFull, Some(ca_path)).await).unwrap_err();
    assert!(misnamed.contains("not valid for name"), "{misnamed}");
    assert_eq!(
        both(attempt(&with_tls, "localhost", SslMode::VerifyFull, Some(ca_path)).await),
        Ok(true)
    );

    // A configuration that cannot verify is refused when it is read.
    let config = format!(
        "[node]\nid = 1\n[[backends]]\nname = \"pg1\"\nport = {}\nsslmode = \"verify-full\"\n",
        with_tls.port()
    );
    let e = chorus_proxy::config::Config::from_toml(&config).unwrap_err();
    assert!(e.to_string().contains("sslrootcert"), "{e}");
}
