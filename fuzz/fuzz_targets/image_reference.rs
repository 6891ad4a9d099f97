//! The image reference parser (smolmachines::image::ImageSource::parse), on strings from a
//! caller or a request body. A registry reference's canonical form must parse to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smolmachines::image::ImageSource;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(src @ ImageSource::Registry(_)) = ImageSource::parse(s) {
        let canonical = src.canonical();
        match ImageSource::parse(&canonical) {
            Ok(again) => assert_eq!(again.canonical(), canonical, "from {s:?}"),
            Err(e) => panic!("the canonical form {canonical:?} of {s:?} does not parse: {e}"),
        }
    }
});
