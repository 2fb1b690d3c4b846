//! Certificates for tests of TLS: self-signed, or signed by a test CA.

use std::path::{Path, PathBuf};

/// Write a self-signed certificate for 127.0.0.1/localhost.
pub fn write_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// A certificate authority for tests: its certificate, written to
/// `dir/ca.crt`, and the server certificates it signs.
pub struct TestCa {
    pub path: PathBuf,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}.crt"));
        std::fs::write(&path, cert.pem()).unwrap();
        TestCa { path, cert, key }
    }

    /// A server certificate for `names` (host names or addresses), and its
    /// key, as PEM.
    pub fn issue(&self, names: &[&str]) -> chorus_proxy::localpg::LocalTls {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        chorus_proxy::localpg::LocalTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            required: false,
        }
    }
}
