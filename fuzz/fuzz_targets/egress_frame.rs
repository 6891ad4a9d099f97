//! The egress filter's parsers (smolmachines::local::egress): Ethernet, IPv4/IPv6, TCP, UDP
//! and DNS from hostile bytes, read as a frame from the guest (the policy's verdict, the
//! resets and REFUSED answers it builds) and as one from passt (DNS answers it learns from).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smolmachines::local::egress::fuzz_frame(data);
});
