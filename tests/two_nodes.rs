//! Two machines: `finetune --nnodes 2 --node-rank K --master-addr 10.77.0.1` run in two network
//! namespaces joined by a veth pair (one rank per "node", Gloo bound to each node's veth end through
//! `GLOO_SOCKET_IFNAME`, the TCPStore rendezvous across the link) trains to the very same weights
//! as the single-node `--nproc-per-node 2` run of the same command.
//!
//! Both runs are two Gloo ranks doing the same arithmetic: the same shards, the same gathered rows
//! in the same order, and all-reduces of two summands (a + b = b + a exactly in IEEE arithmetic),
//! so only the transport differs and the weights must be bit-identical.
//!
//! Needs root (network namespaces): skipped, saying why, where they cannot be created.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::netns::NodePair;
use common::{TINY_VISION, example_bin, tiny_training_fixture};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The longest either run may take (each is a few seconds of training).
const DEADLINE: Duration = Duration::from_secs(300);

/// The training command shared by both runs, writing under `logs`.
fn args(dir: &Path, logs: &Path) -> Vec<String> {
    let p = |rel: &str| dir.join(rel).to_string_lossy().into_owned();
    vec![
        format!("--train-data={}", p("lmdb/train")),
        format!("--vision-model={}", p("vision.json")),
        format!("--text-model={}", p("text.json")),
        format!("--logs={}", logs.display()),
        "--name=two-nodes".into(),
        "--batch-size=4".into(),
        "--max-steps=3".into(),
        "--lr=1e-3".into(),
        "--beta1=0.9".into(),
        "--beta2=0.98".into(),
        "--eps=1e-6".into(),
        "--warmup=1".into(),
        "--seed=7".into(),
        "--num-workers=1".into(),
        "--device=cpu".into(),
        "--dist-timeout=120".into(),
        "--report-training-batch-acc".into(),
    ]
}

fn configured(mut cmd: Command) -> Command {
    cmd.env("OMP_NUM_THREADS", "1")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("LOCAL_RANK")
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .env_remove("GLOO_SOCKET_IFNAME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for every child until `deadline` (killing all past it); returns each one's success and
/// output.
fn wait_all(children: Vec<Child>, deadline: Instant) -> Vec<(bool, String)> {
    let mut pending: Vec<_> = children
        .into_iter()
        .map(|mut child| {
            let mut pipes = [
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ];
            let drains = pipes.each_mut().map(|pipe| {
                let pipe = pipe.take();
                std::thread::spawn(move || {
                    let mut text = String::new();
                    if let Some(mut pipe) = pipe {
                        let _ = pipe.read_to_string(&mut text);
                    }
                    text
                })
            });
            (child, drains, None)
        })
        .collect();
    while pending.iter().any(|(_, _, status)| status.is_none()) {
        for (child, _, status) in &mut pending {
            if status.is_none() {
                *status = child.try_wait().unwrap().map(|s| s.success());
            }
        }
        if Instant::now() > deadline {
            for (child, _, status) in &mut pending {
                if status.is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                    *status = Some(false);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pending
        .into_iter()
        .map(|(_, [out, err], status)| {
            let text = format!(
                "{}{}",
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            );
            (status == Some(true), text)
        })
        .collect()
}

fn final_weights(logs: &Path) -> Vec<(String, tch::Tensor)> {
    let file = logs.join("two-nodes/checkpoints/epoch_latest.safetensors");
    let mut tensors =
        tch::Tensor::read_safetensors(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn two_nodes_over_a_veth_link_equal_one_node_with_two_ranks() {
    let nodes = match NodePair::create("2n") {
        Ok(nodes) => nodes,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };
    let dir: PathBuf =
        std::env::temp_dir().join(format!("cnclip-two-nodes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A mini-MUGE train split of 8 queries × 4 images = 32 pairs and the tiny model configs.
    tiny_training_fixture(&dir, 4, TINY_VISION);
    let bin = example_bin("finetune");

    // One node, two ranks on loopback.
    let single_logs = dir.join("single");
    let port = cnclip::train::ddp::launch::free_port().unwrap().to_string();
    let mut cmd = configured(Command::new(&bin));
    cmd.args(args(&dir, &single_logs))
        .args(["--nproc-per-node", "2", "--master-port", &port]);
    let single = wait_all(vec![cmd.spawn().unwrap()], Instant::now() + DEADLINE);
    assert!(single[0].0, "single-node run failed:\n{}", single[0].1);

    // Two nodes, one rank each, across the veth link.
    let multi_logs = dir.join("multi");
    let children = (0..2)
        .map(|k| {
            let mut cmd = configured(nodes.command(k, &bin));
            cmd.args(args(&dir, &multi_logs))
                .args(["--nproc-per-node", "1", "--nnodes", "2"])
                .args(["--node-rank", &k.to_string()])
                .args(["--master-addr", nodes.address(0), "--master-port", "29577"])
                .env("GLOO_SOCKET_IFNAME", nodes.interface(k));
            cmd.spawn().unwrap()
        })
        .collect();
    let multi = wait_all(children, Instant::now() + DEADLINE);
    for (k, (ok, log)) in multi.iter().enumerate() {
        assert!(ok, "node {k} failed:\n{log}");
    }
    assert!(
        multi[0].1.contains("distributed: 2 ranks over gloo"),
        "{}",
        multi[0].1
    );
    assert!(multi[0].1.contains("trained 3 steps"), "{}", multi[0].1);

    let (a, b) = (final_weights(&single_logs), final_weights(&multi_logs));
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            x.equal(y),
            "{name}: the two-node run's weights differ from the single node's by {:e}",
            (x.to_kind(tch::Kind::Double) - y.to_kind(tch::Kind::Double))
                .abs()
                .max()
                .double_value(&[])
        );
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
