//! TLS for the fake API server, as a cluster's apiserver serves it: a certificate signed by the
//! cluster's CA, whose `ca.crt` clients trust (the kubeconfig's `certificate-authority`, or the
//! service account's `ca.crt` for in-cluster config). The CA and the server certificate are
//! made per test with the openssl CLI (installed by scripts/install-deps).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::FakeApiError;

/// A CA and a server certificate for `ip` (and `kubernetes.default.svc`), as PEM files.
#[derive(Clone, Debug)]
pub struct TestPki {
    /// The CA certificate: what clients trust.
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), FakeApiError> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| {
            FakeApiError::Start(format!("openssl (scripts/install-deps installs it): {e}"))
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FakeApiError::Start(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl TestPki {
    /// A new CA and a server certificate for `ip`, written into `dir` (which must exist).
    pub fn generate(dir: &Path, ip: IpAddr) -> Result<TestPki, FakeApiError> {
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=twill-fakeapi-ca",
        ]);
        openssl(dir, &ca)?;
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=kube-apiserver",
        ]);
        openssl(dir, &csr)?;
        // A leaf certificate (not a CA: rustls refuses a CA certificate as a server's), for the
        // address clients dial and the in-cluster DNS name.
        std::fs::write(
            dir.join("server.ext"),
            format!(
                "subjectAltName=IP:{ip},DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        )?;
        Ok(TestPki {
            ca_cert: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
        })
    }

    /// The server side: the certificate and its key, for the fake's listener.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, FakeApiError> {
        let bad = |what: &Path, e: &dyn std::fmt::Display| {
            FakeApiError::Start(format!("{}: {e}", what.display()))
        };
        let certs = CertificateDer::pem_file_iter(&self.server_cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(&self.server_cert, &e))?;
        let key = PrivateKeyDer::from_pem_file(&self.server_key)
            .map_err(|e| bad(&self.server_key, &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
            .map_err(|e| FakeApiError::Start(format!("TLS: {e}")))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}
