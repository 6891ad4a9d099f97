//! The host side of the agent channel: a Mux (smol_protocol::mux) reading what a guest sends,
//! with the host's hello sent and one operation open (its stream reads every frame routed to
//! it, as the engine's exec does). Whatever the guest sends, the connection must end when the
//! input ends: a panic or a hang is a bug.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use smol_protocol::mux::Mux;
use smol_protocol::{Hello, Op, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let reader = std::io::Cursor::new(data.to_vec());
        let (mux, mut incoming) = Mux::spawn(reader, tokio::io::sink());
        mux.send_hello(Hello {
            version: PROTOCOL_VERSION,
            software: "fuzz".into(),
            kernel: String::new(),
            uptime_ms: 0,
            min_version: MIN_PROTOCOL_VERSION,
            session: Some(7),
        })
        .ok();
        let streams: Vec<_> = [Op::Ping, Op::ReadFile { path: "/f".into() }]
            .into_iter()
            .filter_map(|op| mux.open(op).ok())
            .collect();
        let drive = async {
            for mut s in streams {
                while s.rx.recv().await.is_ok() {}
            }
            mux.closed().await;
        };
        if tokio::time::timeout(Duration::from_secs(10), drive)
            .await
            .is_err()
        {
            panic!("the host mux did not end after its input ended");
        }
        while incoming.try_recv().is_ok() {}
        assert!(
            mux.finish(Duration::from_secs(5)).await,
            "mux tasks did not stop"
        );
    });
});
