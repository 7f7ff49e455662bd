#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyvault::fuzzing::wrapped_key(data));
