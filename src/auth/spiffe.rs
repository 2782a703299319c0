//! SPIFFE IDs (`spiffe://trust-domain/path`) in client certificates, as service meshes and SPIRE
//! issue them. A certificate names a SPIFFE ID only if it carries exactly one URI SAN and that
//! URI is a well-formed SPIFFE ID; callers' `tls_spiffe_id` match it exactly.

use x509_cert::{
    Certificate,
    der::{Decode, oid::AssociatedOid},
    ext::pkix::{SubjectAltName, name::GeneralName},
};

/// The longest SPIFFE ID the specification allows.
const MAX_LEN: usize = 2048;

/// Checks `id` against the SPIFFE ID format: the `spiffe` scheme, a trust domain of lowercase
/// letters, digits, `.`, `-` and `_` (no port, no user), and a path of non-empty segments of
/// letters, digits, `.`, `-` and `_` other than `.` and `..`; no query, fragment or trailing
/// slash.
pub(super) fn parse(id: &str) -> Result<&str, &'static str> {
    if id.len() > MAX_LEN {
        return Err("longer than 2048 bytes");
    }
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or("does not start with spiffe://")?;
    let (domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if domain.is_empty() {
        return Err("has no trust domain");
    }
    if !domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("has a trust domain with characters other than a-z, 0-9, '.', '-', '_'");
    }
    if path.is_empty() {
        return Ok(id);
    }
    for segment in path[1..].split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err("has an empty, '.' or '..' path segment");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err("has a path with characters other than letters, digits, '.', '-', '_'");
        }
    }
    Ok(id)
}

/// The SPIFFE ID a DER certificate names, if it names one (see the module docs).
pub(super) fn of_certificate(der: &[u8]) -> Option<String> {
    let cert = Certificate::from_der(der).ok()?;
    let extensions = cert.tbs_certificate.extensions.as_deref().unwrap_or(&[]);
    let mut uris = Vec::new();
    for extension in extensions {
        if extension.extn_id != SubjectAltName::OID {
            continue;
        }
        let names = SubjectAltName::from_der(extension.extn_value.as_bytes()).ok()?;
        for name in names.0 {
            if let GeneralName::UniformResourceIdentifier(uri) = name {
                uris.push(uri.to_string());
            }
        }
    }
    match uris.as_slice() {
        [one] => parse(one).ok().map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_ids_only() {
        for good in [
            "spiffe://cluster.local/ns/billing/sa/billing-api",
            "spiffe://example.org",
            "spiffe://a_b-c.d/x.y/Z_9",
        ] {
            assert_eq!(parse(good), Ok(good));
        }
        for bad in [
            "https://cluster.local/ns/billing",
            "SPIFFE://cluster.local/x",
            "spiffe://",
            "spiffe:///path",
            "spiffe://Cluster.local/x",
            "spiffe://cluster.local:8443/x",
            "spiffe://user@cluster.local/x",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns//x",
            "spiffe://cluster.local/ns/../x",
            "spiffe://cluster.local/ns/./x",
            "spiffe://cluster.local/x?y=1",
            "spiffe://cluster.local/x#y",
            "spiffe://cluster.local/x%20y",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse(&format!("spiffe://a/{}", "x".repeat(2048))).is_err());
    }
}
