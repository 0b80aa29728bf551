//! Unit tests of `cache.rs`.

use super::*;
use crate::files::write_atomic;
use std::sync::OnceLock;

use crate::wasm::WasmEngine;

fn engine() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE.get_or_init(|| WasmEngine::new(None).unwrap())
}

/// A small component; each `n` another.
fn plugin(n: u32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(component (core module (func (export "f{n}"))))"#
    ))
    .unwrap()
}

fn load(cache: &ArtifactCache, n: u32) -> CacheOutcome {
    cache.load_or_compile(engine(), &plugin(n)).unwrap().1
}

/// The files in `dir` whose name ends with `suffix`.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    found
}

/// The one entry (artifact) in `dir`.
fn artifact(dir: &Path) -> PathBuf {
    let found = files(dir, ".cwasm");
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o777
}

#[test]
fn the_budget_and_directory_are_as_made_and_a_missing_directory_holds_nothing() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("never-made");
    let cache = ArtifactCache::new(&dir).with_max_bytes(1234);
    assert_eq!(cache.max_bytes(), 1234);
    assert_eq!(cache.dir(), dir);
    assert_eq!(cache.size(), 0);
    // Measuring does not make it.
    assert!(!dir.exists());
}

#[test]
fn an_artifact_larger_than_the_whole_budget_is_compiled_but_never_stored() {
    let root = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(root.path()).with_max_bytes(16);
    assert_eq!(load(&cache, 1), CacheOutcome::Compiled);
    assert_eq!(load(&cache, 1), CacheOutcome::Compiled);
    assert!(files(root.path(), ".cwasm").is_empty());
    assert!(files(root.path(), ".mac").is_empty());
    assert_eq!(cache.size(), 0);
}

#[test]
fn an_entry_without_its_mac_is_rebuilt_with_an_older_digest_removed_then_hit() {
    let root = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(root.path());
    assert_eq!(load(&cache, 1), CacheOutcome::Compiled);
    let entry = artifact(root.path());
    std::fs::remove_file(entry.with_extension(MAC_EXTENSION)).unwrap();
    // The digest an older embedhost kept beside its entry.
    let old = entry.with_extension("sha256");
    std::fs::write(&old, "00").unwrap();
    assert_eq!(load(&cache, 1), CacheOutcome::Compiled);
    assert!(!old.exists());
    assert!(entry.with_extension(MAC_EXTENSION).exists());
    assert_eq!(load(&cache, 1), CacheOutcome::Hit);
}

#[test]
fn a_mac_file_that_is_not_hex_is_discarded_and_rebuilt() {
    let root = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(root.path());
    assert_eq!(load(&cache, 1), CacheOutcome::Compiled);
    let mac = artifact(root.path()).with_extension(MAC_EXTENSION);
    for text in ["abc", "zz"] {
        std::fs::write(&mac, text).unwrap();
        assert_eq!(load(&cache, 1), CacheOutcome::Compiled, "{text}");
        assert_ne!(std::fs::read_to_string(&mac).unwrap(), text);
    }
    assert_eq!(load(&cache, 1), CacheOutcome::Hit);
}

#[test]
fn a_fifo_named_as_an_entry_is_never_read_and_is_replaced() {
    let root = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(root.path());
    assert_eq!(load(&cache, 1), CacheOutcome::Compiled);
    let entry = artifact(root.path());
    std::fs::remove_file(&entry).unwrap();
    let c = std::ffi::CString::new(entry.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo(3) with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Opening it to read would block until a writer came: it is refused
    // as no regular file, and rebuilt.
    assert_eq!(load(&cache, 1), CacheOutcome::Compiled);
    assert!(std::fs::symlink_metadata(&entry).unwrap().is_file());
    assert_eq!(load(&cache, 1), CacheOutcome::Hit);
}

#[test]
fn an_entry_that_cannot_be_written_leaves_no_temporary_and_the_plugin_still_loads() {
    // The entry's name, from another cache of the same engine.
    let first = tempfile::tempdir().unwrap();
    load(&ArtifactCache::new(first.path()), 1);
    let name = artifact(first.path()).file_name().unwrap().to_owned();
    // A directory where the entry goes: renaming the entry onto it fails.
    let root = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(root.path());
    std::fs::create_dir(root.path().join(&name)).unwrap();
    let (component, outcome) = cache.load_or_compile(engine(), &plugin(1)).unwrap();
    assert_eq!(outcome, CacheOutcome::Compiled);
    assert!(
        component
            .component_type()
            .exports(engine().engine())
            .next()
            .is_none()
    );
    assert!(root.path().join(&name).is_dir());
    let names: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");
}

#[test]
fn the_entry_just_written_is_kept_even_when_another_looks_more_recently_used() {
    let measure = tempfile::tempdir().unwrap();
    let measured = ArtifactCache::new(measure.path());
    load(&measured, 1);
    let one = measured.size();
    // Room for one entry, not two.
    let root = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(root.path()).with_max_bytes(one + one / 2);
    assert_eq!(load(&cache, 1), CacheOutcome::Compiled);
    let first = artifact(root.path());
    // The first entry looks used later than the one about to be written.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .append(true)
        .open(&first)
        .unwrap()
        .set_modified(later)
        .unwrap();
    assert_eq!(load(&cache, 2), CacheOutcome::Compiled);
    assert!(!first.exists(), "the older entry stays");
    assert!(!first.with_extension(MAC_EXTENSION).exists());
    assert_eq!(files(root.path(), ".cwasm").len(), 1);
    assert_eq!(load(&cache, 2), CacheOutcome::Hit);
    assert!(cache.size() <= cache.max_bytes());
}

#[test]
fn a_directory_others_can_read_is_narrowed_and_only_its_own_files_with_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    let cache = ArtifactCache::new(&dir);
    cache.prepare().unwrap();
    let open = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let own = [
        "a.cwasm",
        "a.mac",
        "old.sha256",
        ".a.cwasm.1.2.tmp",
        KEY_FILE,
    ];
    for name in own {
        let path = dir.join(name);
        if !path.exists() {
            std::fs::write(&path, "x").unwrap();
        }
        open(&path, 0o644);
    }
    std::fs::write(dir.join("notes.txt"), "x").unwrap();
    open(&dir.join("notes.txt"), 0o644);
    std::fs::create_dir(dir.join("folder.cwasm")).unwrap();
    open(&dir.join("folder.cwasm"), 0o755);
    std::os::unix::fs::symlink("notes.txt", dir.join("link.mac")).unwrap();
    open(&dir, 0o755);
    cache.prepare().unwrap();
    assert_eq!(mode(&dir), 0o700);
    for name in own {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
    // Not the cache's: left alone, also through a link.
    assert_eq!(mode(&dir.join("notes.txt")), 0o644);
    assert_eq!(mode(&dir.join("folder.cwasm")), 0o755);
}

#[test]
fn a_key_others_could_read_is_replaced_and_entries_under_the_old_one_are_rebuilt() {
    let root = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(root.path());
    assert_eq!(load(&cache, 1), CacheOutcome::Compiled);
    let key = root.path().join(KEY_FILE);
    let old = std::fs::read(&key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(load(&cache, 1), CacheOutcome::Compiled);
    assert_eq!(mode(&key), 0o600);
    let new = std::fs::read(&key).unwrap();
    assert_eq!(new.len(), 32);
    assert_ne!(new, old);
    assert_eq!(load(&cache, 1), CacheOutcome::Hit);
}

#[test]
fn a_key_that_is_no_regular_file_is_an_error_naming_the_directory() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join(KEY_FILE)).unwrap();
    let err = ArtifactCache::new(root.path()).prepare().unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err, CacheError::Io { dir, .. } if dir == root.path()),
        "{err:?}"
    );
    assert!(text.contains("not a regular file"), "{text}");
}

#[test]
fn a_directory_that_cannot_be_made_is_an_error_naming_it() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("file"), "").unwrap();
    let dir = root.path().join("file").join("cache");
    let err = ArtifactCache::new(&dir).prepare().unwrap_err();
    assert!(
        matches!(&err, CacheError::Io { dir: named, .. } if *named == dir),
        "{err:?}"
    );
    assert!(err.to_string().contains(&*dir.to_string_lossy()), "{err}");
}

#[test]
fn a_directory_or_key_of_another_user_is_refused_as_unsafe() {
    // Giving a file to another user takes root.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: giving a file to another user takes root");
        return;
    }
    let chown = |path: &Path, uid: u32| std::os::unix::fs::chown(path, Some(uid), None).unwrap();
    let root = tempfile::tempdir().unwrap();
    let cache = ArtifactCache::new(root.path());
    cache.prepare().unwrap();
    chown(root.path(), 4242);
    let err = cache.prepare().unwrap_err();
    assert!(matches!(err, CacheError::Unsafe { .. }), "{err:?}");
    assert!(err.to_string().contains("belongs to user 4242"), "{err}");
    chown(root.path(), 0);
    chown(&root.path().join(KEY_FILE), 4242);
    let err = cache.prepare().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CacheError::Unsafe { .. }), "{err:?}");
    assert!(
        text.contains("its key file") && text.contains("belongs to user 4242"),
        "{text}"
    );
}

#[test]
fn a_secret_never_prints_its_bytes() {
    let root = tempfile::tempdir().unwrap();
    let secret = ArtifactCache::new(root.path()).prepare().unwrap();
    assert_eq!(format!("{secret:?}"), "Secret(..)");
}

#[test]
fn an_atomic_write_that_fails_leaves_the_target_and_no_temporary() {
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("target");
    std::fs::create_dir(&target).unwrap();
    assert!(write_atomic(&target, b"bytes").is_err());
    assert!(target.is_dir());
    let names: Vec<_> = std::fs::read_dir(root.path()).unwrap().flatten().collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// A pinned plugin's bytes are read and verified before the cache is
/// asked, by `load` and by `load_snapshot` alike: a file changed after its
/// artifact was cached is refused, never mapped from the cache (the cache
/// is keyed by the bytes, which are read first, never by the path).
#[test]
fn a_changed_pinned_file_is_refused_with_its_artifact_in_the_cache() {
    use crate::wasm::{InstanceLimits, PluginSource, WasmError, WasmPlugin};
    let root = tempfile::tempdir().unwrap();
    let engine = WasmEngine::new(Some(ArtifactCache::new(root.path().join("cache")))).unwrap();
    let bytes = crate::plugins::STUB_WASM_BYTES;
    let path = root.path().join("plugin.wasm");
    std::fs::write(&path, bytes).unwrap();
    let pinned = PluginSource::Pinned {
        path: path.clone(),
        sha256: sha256_hex(bytes),
    };
    for outcome in [CacheOutcome::Compiled, CacheOutcome::Hit] {
        let plugin = WasmPlugin::load(&engine, &pinned).unwrap();
        assert_eq!(plugin.cache_outcome(), outcome);
    }
    let mut changed = bytes.to_vec();
    *changed.last_mut().unwrap() ^= 1;
    std::fs::write(&path, &changed).unwrap();
    let limits = InstanceLimits::default();
    let refused = |loaded: Result<WasmPlugin, WasmError>| match loaded {
        Err(WasmError::Pinned { actual, .. }) => assert_eq!(actual, sha256_hex(&changed)),
        other => panic!("{other:?}"),
    };
    refused(WasmPlugin::load(&engine, &pinned));
    refused(WasmPlugin::load_snapshot(
        &engine,
        &pinned,
        root.path(),
        limits,
        &[],
    ));
}
