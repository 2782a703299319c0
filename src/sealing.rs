//! Encryption at rest: every record the store writes is sealed with XChaCha20-Poly1305.
//!
//! A sealed record is `[1 (format)] [key id: 4 bytes] [nonce: 24 bytes] [ciphertext + tag]`. The
//! additional data binds it to the format, the key id, its tree and its key, so a record copied
//! under another account (or into another tree) fails to open instead of serving the wrong
//! token. The key id is a hash of the key, so a record names the key that opens it: the current
//! key seals, previous keys (`--previous-encryption-key-file`) still open old records until
//! they are re-sealed (`credctl reseal` while serving, `credential-service rotate-keys` when
//! stopped). Keys are 32 random bytes, base64, in a file; without one the service creates
//! `<data-dir>.key` (mode 0600) beside the data directory.
//!
//! A running service takes up new key files on SIGHUP ([`LiveKeyring::reload`]): the keyring in
//! force is swapped whole, and every key it held stays loaded as a previous key until the process
//! ends, so a reload never leaves a record that this process could open unopenable.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use base64::{Engine, engine::general_purpose::STANDARD};
use chacha20poly1305::{AeadInPlace, KeyInit, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

const FORMAT: u8 = 1;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
const AD_CONTEXT: &[u8] = b"credential-service record\0";

/// Where the keys come from.
#[derive(Debug, Clone, Default)]
pub struct EncryptionConfig {
    /// The current key's file; `None`: `<data-dir>.key`, created on first start.
    pub key_file: Option<PathBuf>,
    /// Keys that only open records, during a rotation.
    pub previous_key_files: Vec<PathBuf>,
}

/// Why the keys could not be loaded. Names files, never their contents.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the encryption key file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "the encryption key file {0} must hold 32 random bytes, base64-encoded \
         (create one with: head -c 32 /dev/urandom | base64 > FILE)"
    )]
    Invalid(PathBuf),
    #[error("cannot create the encryption key file {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error(
        "no place for an encryption key beside the data directory {0}; set --encryption-key-file"
    )]
    NoPlaceBeside(PathBuf),
    #[error("the encryption key in {0} is given twice")]
    Duplicate(PathBuf),
    #[error(
        "the data directory {data_dir} holds records sealed with key {key_ids}, but its key file \
         {key_file} is missing; refusing to create a new key that opens none of them: restore \
         {key_file}, or pass the key with --encryption-key-file"
    )]
    MissingForRecords {
        data_dir: PathBuf,
        key_file: PathBuf,
        key_ids: String,
    },
    #[error(
        "the key file {key_file} exists but the data directory {data_dir} does not exist; refusing to \
         start an empty store beside a key whose data is missing: restore the data directory, or \
         move {key_file} aside to start afresh (every account must then be authorized again)"
    )]
    DataDirMissing {
        data_dir: PathBuf,
        key_file: PathBuf,
    },
}

/// Why a sealed record did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsealError {
    #[error("the record is not sealed (or truncated)")]
    NotSealed,
    #[error(
        "the record is sealed with key {0}, which is not loaded; pass its file with --previous-encryption-key-file"
    )]
    UnknownKey(String),
    #[error("the record does not open: wrong key, tampered, or moved from another record")]
    Forged,
}

#[derive(Clone)]
struct SealingKey {
    id: [u8; KEY_ID_LEN],
    cipher: XChaCha20Poly1305,
}

impl SealingKey {
    fn new(bytes: &[u8; 32]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"credential-service key id\0")
            .chain_update(bytes)
            .finalize();
        let mut id = [0; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Self {
            id,
            cipher: XChaCha20Poly1305::new(bytes.into()),
        }
    }
}

/// The current key and any previous ones. Cheap to clone; `Debug` shows key ids only.
#[derive(Clone)]
pub struct Keyring {
    current: Arc<SealingKey>,
    previous: Arc<[SealingKey]>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &hex::encode(self.current.id))
            .field(
                "previous",
                &self
                    .previous
                    .iter()
                    .map(|k| hex::encode(k.id))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Keyring {
    /// A random key held only in memory: for tests and throwaway stores.
    pub fn ephemeral() -> Self {
        Self::from_keys(&rand::random(), &[])
    }

    /// A keyring from raw keys. Duplicates among `previous` are harmless.
    pub fn from_keys(current: &[u8; 32], previous: &[[u8; 32]]) -> Self {
        Self {
            current: Arc::new(SealingKey::new(current)),
            previous: previous.iter().map(SealingKey::new).collect(),
        }
    }

    /// Loads the configured keys; without a key file, reads or creates `<data-dir>.key`.
    pub fn load(config: &EncryptionConfig, data_dir: &Path) -> Result<Self, KeyError> {
        let current = match &config.key_file {
            Some(path) => read_key_file(path)?,
            None => {
                let path = default_key_path(data_dir)?;
                if !path.exists() {
                    create_key_file(&path)?;
                    tracing::warn!(
                        key_file = %path.display(),
                        "created an encryption key beside the data directory; in production, mount your own with --encryption-key-file"
                    );
                }
                read_key_file(&path)?
            }
        };
        let mut previous = Vec::new();
        for path in &config.previous_key_files {
            let key = read_key_file(path)?;
            if key == current {
                return Err(KeyError::Duplicate(path.clone()));
            }
            previous.push(key);
        }
        Ok(Self::from_keys(&current, &previous))
    }

    /// The current key's id, as records name it (hex).
    pub fn current_id(&self) -> String {
        hex::encode(self.current.id)
    }

    /// The previous keys' ids (hex), in the order they are tried.
    pub fn previous_ids(&self) -> Vec<String> {
        self.previous.iter().map(|k| hex::encode(k.id)).collect()
    }

    /// Whether this keyring opens records sealed with the key `id` (hex).
    pub fn holds(&self, id: &str) -> bool {
        std::iter::once(&*self.current)
            .chain(self.previous.iter())
            .any(|k| hex::encode(k.id) == id)
    }

    /// The keyring the configured files hold now, keeping every key of this one as a previous
    /// key. Never creates a key file (a missing default key is an error here, not a new key).
    /// A previous key file that names the new current key is taken as that key, not refused:
    /// during a rotation the files may briefly hold the same key.
    fn reloaded(&self, config: &EncryptionConfig, data_dir: &Path) -> Result<Self, KeyError> {
        let path = match &config.key_file {
            Some(path) => path.clone(),
            None => default_key_path(data_dir)?,
        };
        let current = SealingKey::new(&read_key_file(&path)?);
        let mut previous: Vec<SealingKey> = Vec::new();
        let configured = config
            .previous_key_files
            .iter()
            .map(|path| read_key_file(path).map(|key| SealingKey::new(&key)))
            .collect::<Result<Vec<_>, _>>()?;
        let held = std::iter::once(&*self.current).chain(self.previous.iter());
        for key in configured.iter().chain(held) {
            if key.id != current.id && previous.iter().all(|p| p.id != key.id) {
                previous.push(key.clone());
            }
        }
        Ok(Self {
            current: Arc::new(current),
            previous: previous.into(),
        })
    }

    /// Seals `plaintext` with the current key for `tree`/`key`.
    pub fn seal(&self, tree: &str, key: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.push(FORMAT);
        out.extend_from_slice(&self.current.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let ad = additional_data(&out[..1 + KEY_ID_LEN], tree, key);
        let tag = self
            .current
            .cipher
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &ad, &mut out[HEADER_LEN..])
            .expect("XChaCha20-Poly1305 seals any length this store writes");
        out.extend_from_slice(&tag);
        out
    }

    /// The id (hex) of the key that sealed `sealed`, read from its header without opening it, so
    /// that a missing key can be named.
    pub fn key_id_of(sealed: &[u8]) -> Option<String> {
        (sealed.len() >= HEADER_LEN && sealed[0] == FORMAT)
            .then(|| hex::encode(&sealed[1..1 + KEY_ID_LEN]))
    }

    /// Opens a record sealed for `tree`/`key`. Also says whether the current key sealed it.
    pub fn unseal(&self, tree: &str, key: &[u8], sealed: &[u8]) -> Result<Unsealed, UnsealError> {
        if sealed.len() < HEADER_LEN + TAG_LEN || sealed[0] != FORMAT {
            return Err(UnsealError::NotSealed);
        }
        let id = &sealed[1..1 + KEY_ID_LEN];
        let (sealing, current) = if id == self.current.id {
            (&*self.current, true)
        } else {
            let previous = self.previous.iter().find(|k| k.id == id);
            (
                previous.ok_or_else(|| UnsealError::UnknownKey(hex::encode(id)))?,
                false,
            )
        };
        let nonce = XNonce::from_slice(&sealed[1 + KEY_ID_LEN..HEADER_LEN]);
        let (body, tag) = sealed[HEADER_LEN..].split_at(sealed.len() - HEADER_LEN - TAG_LEN);
        let ad = additional_data(&sealed[..1 + KEY_ID_LEN], tree, key);
        let mut plaintext = body.to_vec();
        sealing
            .cipher
            .decrypt_in_place_detached(nonce, &ad, &mut plaintext, tag.into())
            .map_err(|_| UnsealError::Forged)?;
        Ok(Unsealed { plaintext, current })
    }
}

/// The keyring in force, shared by the store (which seals and opens with it) and the key reload
/// (SIGHUP, ResealRecords), which replaces it whole: each record is sealed or opened with one
/// keyring, never with a half-loaded one. Cheap to clone; every clone sees a reload.
#[derive(Clone)]
pub struct LiveKeyring {
    keys: Arc<ArcSwap<Keyring>>,
    /// The key files a reload reads: none for a keyring built in memory.
    files: Option<Arc<(EncryptionConfig, PathBuf)>>,
    /// One reload at a time, so two at once cannot drop a key the other retained.
    reloading: Arc<std::sync::Mutex<()>>,
}

impl fmt::Debug for LiveKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.keys.load().fmt(f)
    }
}

impl From<Keyring> for LiveKeyring {
    fn from(keys: Keyring) -> Self {
        Self {
            keys: Arc::new(ArcSwap::from_pointee(keys)),
            files: None,
            reloading: Arc::default(),
        }
    }
}

/// What [`LiveKeyring::reload`] did. Key ids only, never key bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files hold the keys already in force.
    Unchanged { current: String },
    /// New writes seal with `current`; `previous` still open older records.
    Changed {
        current: String,
        previous: Vec<String>,
    },
}

impl LiveKeyring {
    /// `keys` as loaded from `config` (beside `data_dir` for the default key), which
    /// [`LiveKeyring::reload`] reads again.
    pub fn from_files(keys: Keyring, config: EncryptionConfig, data_dir: PathBuf) -> Self {
        Self {
            files: Some(Arc::new((config, data_dir))),
            ..Self::from(keys)
        }
    }

    /// The keyring in force now.
    pub fn get(&self) -> Arc<Keyring> {
        self.keys.load_full()
    }

    /// Puts `keys` in force, as a reload would (tests rotate keys without files).
    #[cfg(test)]
    pub(crate) fn set(&self, keys: Keyring) {
        self.keys.store(Arc::new(keys));
    }

    /// Reads the key files again (`--encryption-key-file`, or `<data-dir>.key`, and each
    /// `--previous-encryption-key-file`) and puts them in force, every key held so far staying
    /// loaded as a previous one. A file that does not load changes nothing: the error names the
    /// file (never its content) and the keys in force stay. Without files, nothing changes.
    pub fn reload(&self) -> Result<Reload, KeyError> {
        match &self.files {
            Some(files) => self.reload_from(&files.0, &files.1),
            None => Ok(Reload::Unchanged {
                current: self.get().current_id(),
            }),
        }
    }

    fn reload_from(&self, config: &EncryptionConfig, data_dir: &Path) -> Result<Reload, KeyError> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.keys.load_full();
        let new = old.reloaded(config, data_dir)?;
        let current = new.current_id();
        if new.current.id == old.current.id && new.previous.len() == old.previous.len() {
            return Ok(Reload::Unchanged { current });
        }
        let previous = new.previous_ids();
        self.keys.store(Arc::new(new));
        Ok(Reload::Changed { current, previous })
    }
}

/// An opened record. `Debug` leaves out the plaintext.
pub struct Unsealed {
    pub plaintext: Vec<u8>,
    /// Sealed with the current key (nothing to re-seal).
    pub current: bool,
}

impl fmt::Debug for Unsealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unsealed")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

fn additional_data(header: &[u8], tree: &str, key: &[u8]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_CONTEXT.len() + header.len() + tree.len() + 1 + key.len());
    ad.extend_from_slice(AD_CONTEXT);
    ad.extend_from_slice(header);
    ad.extend_from_slice(tree.as_bytes());
    ad.push(0);
    ad.extend_from_slice(key);
    ad
}

/// `<data-dir>.key`: beside the data directory, so a copy of the directory alone opens nothing.
pub fn default_key_path(data_dir: &Path) -> Result<PathBuf, KeyError> {
    let name = data_dir
        .file_name()
        .ok_or_else(|| KeyError::NoPlaceBeside(data_dir.to_owned()))?;
    let mut file = name.to_os_string();
    file.push(".key");
    Ok(data_dir.with_file_name(file))
}

/// Writes a fresh random key to `path` (mode 0600); fails if the file exists. Durable before it
/// returns, and whole or absent after a power cut: written to a temporary name and fsynced,
/// linked into place (which fails if another process created it first), then the directory is
/// fsynced. A key lost after records were sealed with it would lose every grant.
pub fn create_key_file(path: &Path) -> Result<(), KeyError> {
    use std::io::Write;
    let create = || -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        let key: [u8; 32] = rand::random();
        writeln!(file, "{}", STANDARD.encode(key))?;
        file.sync_all()?;
        let linked = std::fs::hard_link(&tmp, path);
        std::fs::remove_file(&tmp)?;
        linked?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
    };
    create().map_err(|source| KeyError::Create {
        path: path.to_owned(),
        source,
    })
}

/// Logs one warning, naming the file and its mode (never its content), when a secret file is open
/// to its group or to others: anyone who can read it holds what it protects.
pub fn warn_if_open_to_others(path: &Path, what: &str) {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = %format_args!("{mode:04o}"),
                "{what} is open to group or others; chmod 600 it"
            );
        }
    }
}

fn read_key_file(path: &Path) -> Result<[u8; 32], KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    warn_if_open_to_others(path, "the encryption key file");
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| KeyError::Invalid(path.to_owned()))?;
    bytes
        .try_into()
        .map_err(|_| KeyError::Invalid(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_records_open_only_for_their_tree_and_key() {
        let keys = Keyring::ephemeral();
        let sealed = keys.seal("accounts", b"acme", b"secret token set");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        let opened = keys.unseal("accounts", b"acme", &sealed).unwrap();
        assert_eq!(opened.plaintext, b"secret token set");
        assert!(opened.current);
        assert_eq!(
            keys.unseal("accounts", b"globex", &sealed).err(),
            Some(UnsealError::Forged)
        );
        assert_eq!(
            keys.unseal("pending", b"acme", &sealed).err(),
            Some(UnsealError::Forged)
        );
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(
            keys.unseal("accounts", b"acme", &flipped).err(),
            Some(UnsealError::Forged)
        );
        assert_eq!(
            keys.unseal("accounts", b"acme", b"\x08\x01plain protobuf record")
                .err(),
            Some(UnsealError::NotSealed)
        );
        // Two seals of the same record differ (fresh nonces).
        assert_ne!(sealed, keys.seal("accounts", b"acme", b"secret token set"));
    }

    #[test]
    fn previous_keys_open_old_records_and_unknown_keys_are_named() {
        let (a, b) = (rand::random::<[u8; 32]>(), rand::random::<[u8; 32]>());
        let old = Keyring::from_keys(&a, &[]);
        let sealed = old.seal("accounts", b"acme", b"x");
        let rotated = Keyring::from_keys(&b, &[a]);
        let opened = rotated.unseal("accounts", b"acme", &sealed).unwrap();
        assert_eq!(opened.plaintext, b"x");
        assert!(!opened.current);
        let only_b = Keyring::from_keys(&b, &[]);
        let e = only_b.unseal("accounts", b"acme", &sealed).unwrap_err();
        assert_eq!(e, UnsealError::UnknownKey(old.current_id()));
        assert!(e.to_string().contains("--previous-encryption-key-file"));
        assert!(!format!("{rotated:?}").contains(&STANDARD.encode(a)));
    }

    /// A reload puts the key file's new key in force for sealing and keeps the old one for
    /// opening; a file that does not load changes nothing; the same files again change nothing.
    #[test]
    fn a_reload_seals_with_the_new_key_keeps_the_old_and_survives_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        create_key_file(&path).unwrap();
        let config = EncryptionConfig {
            key_file: Some(path.clone()),
            previous_key_files: vec![],
        };
        let live = LiveKeyring::from_files(
            Keyring::load(&config, dir.path()).unwrap(),
            config.clone(),
            dir.path().to_owned(),
        );
        let old = live.get().current_id();
        let sealed_old = live.get().seal("accounts", b"acme", b"x");
        assert_eq!(
            live.reload().unwrap(),
            Reload::Unchanged {
                current: old.clone()
            }
        );

        std::fs::write(&path, "not a key").unwrap();
        let e = live.reload().unwrap_err().to_string();
        assert!(
            e.contains("32 random bytes") && !e.contains("not a key"),
            "{e}"
        );
        assert_eq!(live.get().current_id(), old, "the keys in force stay");

        std::fs::remove_file(&path).unwrap();
        create_key_file(&path).unwrap();
        let Reload::Changed { current, previous } = live.reload().unwrap() else {
            panic!("a new key is a change");
        };
        assert_ne!(current, old);
        assert_eq!(previous, vec![old.clone()]);
        let keys = live.get();
        assert!(keys.holds(&old) && keys.holds(&current));
        let opened = keys.unseal("accounts", b"acme", &sealed_old).unwrap();
        assert!(!opened.current, "sealed with the previous key");
        let sealed_new = keys.seal("accounts", b"acme", b"y");
        assert_eq!(Keyring::key_id_of(&sealed_new), Some(current.clone()));

        // The old key named as previous too (as the README's steps do) is the same key, once.
        let old_file = dir.path().join("old");
        std::fs::write(&old_file, "").unwrap();
        let with_previous = EncryptionConfig {
            key_file: Some(path.clone()),
            previous_key_files: vec![old_file.clone(), path.clone()],
        };
        assert!(
            live.reload_from(&with_previous, dir.path()).is_err(),
            "an empty file does not load"
        );
        std::fs::remove_file(&old_file).unwrap();
        create_key_file(&old_file).unwrap();
        let Reload::Changed { previous, .. } =
            live.reload_from(&with_previous, dir.path()).unwrap()
        else {
            panic!("one more previous key is a change");
        };
        assert_eq!(previous.len(), 2, "{previous:?}");
        assert_eq!(live.get().current_id(), current);
        assert!(!format!("{live:?}").contains(std::fs::read_to_string(&path).unwrap().trim()));
    }

    /// Without `--encryption-key-file`, a reload reads `<data-dir>.key` again, and never creates
    /// one: a missing default key is an error that changes nothing.
    #[test]
    fn a_reload_of_the_default_key_reads_it_again_and_never_creates_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let config = EncryptionConfig::default();
        let live =
            LiveKeyring::from_files(Keyring::load(&config, &data).unwrap(), config, data.clone());
        let old = live.get().current_id();
        let path = default_key_path(&data).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(live.reload(), Err(KeyError::Read { .. })));
        assert!(!path.exists(), "a reload creates no key");
        assert_eq!(live.get().current_id(), old);
        create_key_file(&path).unwrap();
        let Reload::Changed { current, previous } = live.reload().unwrap() else {
            panic!("the new default key is a change");
        };
        assert_ne!(current, old);
        assert_eq!(previous, vec![old]);
    }

    #[test]
    fn a_missing_key_is_created_private_beside_the_data_directory_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = Keyring::load(&EncryptionConfig::default(), &data).unwrap();
        let path = dir.path().join("data.key");
        assert_eq!(default_key_path(&data).unwrap(), path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Keyring::load(&EncryptionConfig::default(), &data).unwrap();
        assert_eq!(first.current_id(), again.current_id());
    }

    #[test]
    fn bad_key_files_are_refused_without_quoting_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "not-base64-but-a-secret").unwrap();
        let config = EncryptionConfig {
            key_file: Some(path.clone()),
            previous_key_files: vec![],
        };
        let e = Keyring::load(&config, dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("32 random bytes") && !e.contains("a-secret"),
            "{e}"
        );
        std::fs::write(&path, STANDARD.encode([7u8; 16])).unwrap();
        assert!(Keyring::load(&config, dir.path()).is_err());
        let missing = EncryptionConfig {
            key_file: Some(dir.path().join("absent")),
            previous_key_files: vec![],
        };
        assert!(matches!(
            Keyring::load(&missing, dir.path()),
            Err(KeyError::Read { .. })
        ));
    }
}
