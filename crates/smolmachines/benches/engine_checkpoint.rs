//! Row 6 of the engine bench (`SMOL_BENCH_ONLY=checkpoint`): checkpoint of a branchable
//! 256 MiB guest with 100 MiB of dirty memory (random bytes in its tmpfs), then a restore of
//! that file into a new machine -> first exec. Seconds and the file's size, printed (never
//! asserted).

use std::time::Instant;

use smolmachines::local::LocalBackend;
use smolmachines::{
    CheckpointOptions, ExecOptions, Machine, MachineBackend, MachineConfig, ResourceSpec,
    RestoreOptions,
};

const ROUNDS: usize = 3;

pub async fn checkpointing(engine: &LocalBackend, dir: &std::path::Path) {
    let t = vec!["true".to_string()];
    let opts = ExecOptions::default();
    let src = engine
        .create_machine(MachineConfig {
            name: Some("ckpt-src".into()),
            branchable: Some(true),
            resources: ResourceSpec {
                memory_mb: Some(256),
                ..Default::default()
            },
            ..Default::default()
        })
        .await
        .unwrap();
    let dirty = vec![
        "sh".to_string(),
        "-c".into(),
        "mkdir -p /run/dirty && mount -t tmpfs -o size=128m none /run/dirty && \
         head -c 104857600 /dev/urandom > /run/dirty/x"
            .into(),
    ];
    let r = src.exec(&dirty, &opts).await.unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let (mut take, mut back, mut pause, mut size) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for i in 0..ROUNDS {
        let file = dir.join(format!("bench-{i}.smolcheckpoint"));
        let t0 = Instant::now();
        let info = src
            .checkpoint(&CheckpointOptions {
                output: Some(file.clone()),
                store: None,
            })
            .await
            .unwrap();
        take.push(t0.elapsed().as_secs_f64());
        pause.push(info.source_pause_ms.unwrap_or(0) as f64 / 1e3);
        size = info.size_bytes;
        let t0 = Instant::now();
        let m = Machine::restore_checkpoint_on(
            engine,
            file.to_str().unwrap(),
            &format!("ckpt-restored-{i}"),
            RestoreOptions::default(),
        )
        .await
        .unwrap();
        m.exec(&t, opts.clone()).await.unwrap();
        back.push(t0.elapsed().as_secs_f64());
        m.delete().await.unwrap();
        std::fs::remove_file(&file).unwrap();
    }
    src.delete().await.unwrap();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!(
        "checkpoint (256 MiB guest, 100 MiB dirty): {:.2} s (source paused {:.3} s), file {:.1} MiB; \
         restore -> first exec: {:.2} s (median of {ROUNDS})",
        median(&mut take),
        median(&mut pause),
        size as f64 / (1 << 20) as f64,
        median(&mut back),
    );
}
