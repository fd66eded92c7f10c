//! `cargo xtask man` writes man pages that document the real flags: runs
//! the real xtask binary into a fresh directory and reads the pages back
//! (`man` itself renders them when it is installed).

use std::path::{Path, PathBuf};
use std::process::Command;

fn fresh_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zrpc-man-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn xtask(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask")
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn man_pages_document_the_real_flags() {
    let dir = fresh_dir("plain");
    let out = xtask(&["man", dir.to_str().expect("utf-8 temp dir")]);
    assert!(out.status.success(), "{out:?}");

    let zrpcd = read(&dir, "zrpcd.8");
    assert!(
        zrpcd.starts_with(".ie") || zrpcd.contains(".TH zrpcd 8"),
        "{zrpcd}"
    );
    for flag in [
        "caller\\-grace",
        "socket\\-dir",
        "policy",
        "busy\\-poll\\-us",
    ] {
        assert!(zrpcd.contains(flag), "zrpcd.8 mentions --{flag}");
    }
    assert!(
        zrpcd.contains("ZRPC_SOCKET_DIR"),
        "the environment variable"
    );

    let zrpc = read(&dir, "zrpc.1");
    assert!(zrpc.contains(".TH zrpc 1"), "{zrpc}");
    for sub in ["call", "list", "monitor", "stats", "completions"] {
        assert!(zrpc.contains(sub), "zrpc.1 lists {sub}");
        let page = read(&dir, &format!("zrpc-{sub}.1"));
        assert!(page.contains(&format!(".TH zrpc-{sub} 1")), "{page}");
    }
    let stats = read(&dir, "zrpc-stats.1");
    assert!(stats.contains("openmetrics"), "{stats}");

    // Rendered by man(1) without warnings when it is installed.
    if Command::new("man").arg("--version").output().is_ok() {
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(dir.join("zrpcd.8"))
            .env("MANWIDTH", "200")
            .output()
            .expect("man");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("--caller-grace"), "{text}");
    } else {
        eprintln!("man(1) is not installed: the pages are not rendered here (only read)");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gzipped_pages_decompress_to_the_same_text() {
    let plain = fresh_dir("p2");
    let gz = fresh_dir("gz");
    assert!(xtask(&["man", plain.to_str().expect("utf-8")])
        .status
        .success());
    assert!(xtask(&["man", "--gzip", gz.to_str().expect("utf-8")])
        .status
        .success());
    let bytes = std::fs::read(gz.join("zrpcd.8.gz")).expect("zrpcd.8.gz");
    assert_eq!(&bytes[..2], b"\x1f\x8b", "gzip magic");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
        .expect("gunzip");
    assert_eq!(text, read(&plain, "zrpcd.8"));
    // Reproducible: no timestamp in the gzip header.
    assert_eq!(&bytes[4..8], &[0, 0, 0, 0]);
    assert!(!xtask(&["man", "--bogus"]).status.success());
    let _ = std::fs::remove_dir_all(&plain);
    let _ = std::fs::remove_dir_all(&gz);
}

/// The pages in `man/` (installed by `make install` and `cargo deb`, which
/// gzips them) are the generated ones: a flag added without regenerating
/// them fails here.
#[test]
fn committed_pages_are_up_to_date() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../man");
    let fresh = fresh_dir("fresh");
    assert!(xtask(&["man", fresh.to_str().expect("utf-8")])
        .status
        .success());
    let mut names: Vec<_> = std::fs::read_dir(&fresh)
        .expect("generated")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        let name = name.to_string_lossy();
        let want = read(&fresh, &name);
        let have = std::fs::read_to_string(committed.join(&*name)).unwrap_or_default();
        assert!(
            have == want,
            "man/{name} is out of date: run `cargo xtask man man` and commit the result"
        );
    }
    let _ = std::fs::remove_dir_all(&fresh);
}
