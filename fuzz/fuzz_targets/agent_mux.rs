//! The agent's decoder: a Mux as the agent's session runs it (smol-agent/src/serve.rs), reading
//! what a host sends, with the host's hello already settled (the first byte picks none or a
//! generation) and every stream the host opens read to its end, as the agent's handlers read
//! stdin and file data. The handlers themselves (exec, files) are not run. Whatever the host
//! sends, the session must end when the input ends.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use smol_protocol::mux::{Incoming, Mux, MuxConfig};
use smol_protocol::{Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let span = PROTOCOL_VERSION - MIN_PROTOCOL_VERSION + 2;
    let peer_hello = match u16::from(pick) % span {
        0 => None,
        n => Some(Hello {
            version: MIN_PROTOCOL_VERSION + n - 1,
            software: "fuzz-host".into(),
            kernel: String::new(),
            uptime_ms: 0,
            min_version: MIN_PROTOCOL_VERSION,
            session: Some(9),
        }),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let reader = std::io::Cursor::new(rest.to_vec());
        let (mux, mut incoming) = Mux::spawn_with(
            reader,
            tokio::io::sink(),
            MuxConfig {
                peer_hello,
                ..MuxConfig::default()
            },
        );
        let session = async {
            let mut readers = tokio::task::JoinSet::new();
            while let Some(inc) = incoming.recv().await {
                if let Incoming::Open(mut stream, _op) = inc {
                    readers.spawn(async move { while stream.rx.recv().await.is_ok() {} });
                }
            }
            while readers.join_next().await.is_some() {}
        };
        let ended = async {
            tokio::select! {
                _ = session => {}
                _ = mux.closed() => {}
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .is_err()
        {
            panic!("the agent's session did not end after its input ended");
        }
        assert!(
            mux.finish(Duration::from_secs(5)).await,
            "mux tasks did not stop"
        );
    });
});
