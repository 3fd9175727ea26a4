//! A certificate authority made at test time, and the certificates it issues, as PEM files in
//! a directory of their own (removed when the authority is dropped).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A private certificate authority for one test: its certificate and the certificates it
/// issues are PEM files in a fresh directory, removed on drop. Nothing trusts it but what is
/// told to (a broker's or client's CA file).
pub struct TestCa {
    dir: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// The files of a certificate a [`TestCa`] issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8, not encrypted).
    pub key: PathBuf,
    /// The key followed by the certificate, as one PEM file (a Kafka `PEM` keystore).
    pub key_and_cert: PathBuf,
}

impl TestCa {
    /// A new authority named `name` (the name only tells its directory apart).
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "eventbus-ca-{name}-{}-{}",
            std::process::id(),
            crate::free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the test CA");
        let key = KeyPair::generate().expect("a CA key");
        let mut params =
            CertificateParams::new(Vec::<String>::new()).expect("CA certificate parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("eventbus test CA {name}"),
        );
        let cert = params
            .self_signed(&key)
            .expect("a self-signed CA certificate");
        std::fs::write(dir.join("ca.pem"), cert.pem()).expect("ca.pem written");
        Self { dir, cert, key }
    }

    /// The authority's certificate (PEM): the file to trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The directory its files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a certificate for `names` (DNS names or IP addresses, the first also its common
    /// name), written as `{file}.pem`, `{file}-key.pem` and `{file}-keystore.pem`.
    pub fn issue(&self, file: &str, names: &[&str]) -> Issued {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(
            names
                .iter()
                .map(|name| (*name).to_owned())
                .collect::<Vec<_>>(),
        )
        .expect("certificate parameters");
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, *first);
        }
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("a certificate signed by the test CA");
        let issued = Issued {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
            key_and_cert: self.dir.join(format!("{file}-keystore.pem")),
        };
        let key_pem = key.serialize_pem();
        std::fs::write(&issued.cert, cert.pem()).expect("certificate written");
        std::fs::write(&issued.key, &key_pem).expect("key written");
        std::fs::write(&issued.key_and_cert, format!("{key_pem}{}", cert.pem()))
            .expect("keystore written");
        issued
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
