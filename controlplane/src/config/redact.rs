//! Key material never leaves the hub through the admin API: the documents that
//! `GET /config` lists, and the `before`/`after` texts an apply or delete reports, are
//! passed through [`redact_document`] first.
//!
//! Two passes, so that neither a key in an unexpected place nor one in an unusual
//! encoding gets through: a `Credential`'s `spec.privateKey` is replaced whatever its
//! value (PEM, an escaped string, anything), and then every PEM block whose label ends
//! in `PRIVATE KEY` (`PRIVATE KEY`, `EC PRIVATE KEY`, `RSA PRIVATE KEY`,
//! `ENCRYPTED PRIVATE KEY`), anywhere in any document, is replaced by [`REDACTED`].

/// What stands where a key was.
pub const REDACTED: &str = "<redacted: private key>";

/// `doc` without its key material (unchanged when it holds none).
pub fn redact_document(doc: &str) -> String {
    let doc = redact_credential(doc).unwrap_or_else(|| doc.to_string());
    redact_pem_keys(&doc)
}

/// A `Credential` document with `spec.privateKey` replaced; `None` when `doc` is not
/// a YAML `Credential` with a key (the PEM pass still runs on it).
fn redact_credential(doc: &str) -> Option<String> {
    let mut value: serde_yaml::Value = serde_yaml::from_str(doc).ok()?;
    if value.get("kind")?.as_str()? != "Credential" {
        return None;
    }
    let key = value.get_mut("spec")?.get_mut("privateKey")?;
    *key = serde_yaml::Value::String(REDACTED.to_string());
    serde_yaml::to_string(&value).ok()
}

/// `text` with every `-----BEGIN … PRIVATE KEY-----` … `-----END … PRIVATE KEY-----`
/// block replaced by [`REDACTED`]. A BEGIN without its END redacts to the end of the
/// text (a truncated key is still a secret).
fn redact_pem_keys(text: &str) -> String {
    const BEGIN: &str = "-----BEGIN ";
    const END: &str = "-----END ";
    const TAIL: &str = "PRIVATE KEY-----";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let after_begin = &rest[start + BEGIN.len()..];
        // The label ends at the next "-----"; only key labels are redacted.
        let Some(label_len) = after_begin.find("-----") else {
            break;
        };
        let label_end = start + BEGIN.len() + label_len + "-----".len();
        if !rest[..label_end].ends_with(TAIL) {
            out.push_str(&rest[..label_end]);
            rest = &rest[label_end..];
            continue;
        }
        out.push_str(&rest[..start]);
        out.push_str(REDACTED);
        rest = match rest[label_end..].find(END) {
            Some(e) => {
                let from_end = &rest[label_end + e..];
                match from_end[END.len()..].find("-----") {
                    Some(l) => &from_end[END.len() + l + "-----".len()..],
                    None => "",
                }
            }
            None => "",
        };
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
    const CERT: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n";

    fn credential(key_yaml: &str) -> String {
        let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
        format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Credential\nmetadata: {{name: wild, environment: prod}}\nspec:\n  certificate: |\n{}  privateKey: {key_yaml}",
            indent(CERT)
        )
    }

    #[test]
    fn a_credentials_key_is_replaced_and_its_certificate_kept() {
        let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
        let doc = credential(&format!("|\n{}", indent(KEY)));
        let out = redact_document(&doc);
        assert!(!out.contains("MIGHAgEA"), "{out}");
        assert!(!out.contains("PRIVATE KEY-----"), "{out}");
        let v: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(v["spec"]["privateKey"].as_str(), Some(REDACTED));
        assert_eq!(v["spec"]["certificate"].as_str(), Some(CERT));
        assert_eq!(v["metadata"]["name"].as_str(), Some("wild"));
    }

    #[test]
    fn a_key_that_is_not_pem_is_still_replaced() {
        let out = redact_document(&credential("\"c2VjcmV0LWtleS1ieXRlcw==\"\n"));
        assert!(!out.contains("c2VjcmV0"), "{out}");
        assert!(out.contains(REDACTED), "{out}");
    }

    #[test]
    fn pem_keys_anywhere_are_replaced_and_other_pem_blocks_kept() {
        for label in ["PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"] {
            let key = KEY.replace("PRIVATE KEY", label);
            // Not a Credential, not even YAML: the PEM pass alone.
            let text = format!("before\n{CERT}{key}after {{ unbalanced\n");
            let out = redact_document(&text);
            assert_eq!(
                out,
                format!("before\n{CERT}{REDACTED}\nafter {{ unbalanced\n")
            );
        }
        // A key without its END line: redacted to the end.
        let out = redact_pem_keys("x: -----BEGIN PRIVATE KEY-----\nMIGHAgEA");
        assert_eq!(out, format!("x: {REDACTED}"));
        // No key: the text is unchanged, byte for byte.
        let plain = format!("kind: Service\nspec: {{ports: [80]}}\n# {CERT}");
        assert_eq!(redact_document(&plain), plain);
    }
}
