//! kill -9 during `build_split` (issue 11): whenever the builder dies, `{lmdb}/{split}` is either
//! absent or the complete previous/new split, never a half-written one, and the next build
//! succeeds and removes what the dead one left behind.
//!
//! The test binary re-executes itself: the child runs the `child_builds` test (which only builds
//! when `CNCLIP_KILL_CHILD` names a directory) and the parent SIGKILLs it at points spread over
//! the length of an uninterrupted build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TempDir, tiny_data};
use muge_data::files::BadRecordPolicy;
use muge_data::lmdb::{LmdbSplit, build_split};

const CHILD_ENV: &str = "CNCLIP_KILL_CHILD";
const IMAGES: usize = 1500;

/// A split big enough that a debug build takes a noticeable time: the tiny split's images
/// repeated under new ids, one text per image.
fn write_inputs(data: &Path) {
    std::fs::create_dir_all(data).unwrap();
    let tsv = std::fs::read_to_string(tiny_data().join("train_imgs.tsv")).unwrap();
    let b64: Vec<&str> = tsv.lines().filter_map(|l| l.split('\t').nth(1)).collect();
    let mut imgs = String::new();
    let mut texts = String::new();
    for i in 0..IMAGES {
        imgs.push_str(&format!("{}\t{}\n", 10_000 + i, b64[i % b64.len()]));
        texts.push_str(&format!(
            "{{\"text_id\": {i}, \"text\": \"商品 {i}\", \"image_ids\": [{}]}}\n",
            10_000 + i
        ));
    }
    std::fs::write(data.join("train_imgs.tsv"), imgs).unwrap();
    std::fs::write(data.join("train_texts.jsonl"), texts).unwrap();
}

/// Builds the split; `started`, if given, is created once the builder has begun writing.
fn build(root: &Path, started: Option<&Path>) {
    let mut marked = false;
    build_split(
        &root.join("data"),
        "train",
        &root.join("lmdb"),
        BadRecordPolicy::Fail,
        &mut |_| {
            if let (false, Some(path)) = (marked, started) {
                std::fs::write(path, b"").unwrap();
                marked = true;
            }
        },
    )
    .unwrap();
}

/// Waits until `marker` exists or the child has exited.
fn wait_for_start(marker: &Path, child: &mut Child) {
    let t = Instant::now();
    while !marker.exists() && t.elapsed() < Duration::from_secs(120) {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The child: builds the split under `$CNCLIP_KILL_CHILD` (in the parent's own run, a no-op).
#[test]
fn child_builds() {
    if let Some(root) = std::env::var_os(CHILD_ENV) {
        let root = Path::new(&root);
        build(root, Some(&root.join("started")));
    }
}

fn assert_complete_or_absent(lmdb: &Path) {
    let dir = lmdb.join("train");
    if !dir.exists() {
        return;
    }
    let split = LmdbSplit::open(&dir).unwrap();
    assert_eq!(split.num_images(), IMAGES as u64);
    assert_eq!(split.num_samples(), IMAGES as u64);
    assert!(split.missing_images().unwrap().is_empty());
    let reader = split.reader().unwrap();
    let last = reader.sample(IMAGES as u64 - 1);
    assert!(last.is_ok(), "{:?}", last.err());
    drop(reader);
}

#[test]
fn kill_9_during_build_never_leaves_a_partial_split() {
    let d = TempDir::new("kill");
    write_inputs(&d.path().join("data"));
    let exe = std::env::current_exe().unwrap();
    let spawn = || {
        Command::new(&exe)
            .args(["--exact", "child_builds", "--test-threads=1"])
            .env(CHILD_ENV, d.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let marker = d.path().join("started");
    // An uninterrupted child build, for the length of one (from its first write to its exit).
    let mut child = spawn();
    wait_for_start(&marker, &mut child);
    let t = Instant::now();
    assert!(child.wait().unwrap().success());
    let full = t.elapsed();
    assert_complete_or_absent(&d.path().join("lmdb"));

    let lmdb = d.path().join("lmdb");
    let mut killed_with_leftovers = 0;
    for k in 0..8u32 {
        // Half the kills replace an existing split, half build into an empty directory.
        if k % 2 == 0 {
            let _ = std::fs::remove_dir_all(&lmdb);
        }
        let _ = std::fs::remove_file(&marker);
        let mut child = spawn();
        wait_for_start(&marker, &mut child);
        // Kill 0 lands right after the first write; the others spread over the build.
        std::thread::sleep(full.mul_f64(f64::from(k) / 8.0));
        let _ = child.kill(); // SIGKILL; the child may already have finished
        child.wait().unwrap();
        assert_complete_or_absent(&lmdb);
        if std::fs::read_dir(&lmdb).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".train."))
        }) {
            killed_with_leftovers += 1;
        }
        // The next build succeeds and cleans up after the dead one.
        build(d.path(), None);
        assert_complete_or_absent(&lmdb);
        let names: Vec<String> = std::fs::read_dir(&lmdb)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["train"], "kill {k}: leftovers {names:?}");
    }
    // Kill 0 at least must have hit the middle of a build, or the test tested nothing.
    assert!(
        killed_with_leftovers > 0,
        "no kill landed inside a build ({full:?} per build)"
    );
}
